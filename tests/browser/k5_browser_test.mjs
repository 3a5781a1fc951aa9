// Headless-Chromium test of js/kandinsky5.js on the real ComfyUI frontend served by a running ComfyUI.
// Run by tests/integration/test_browser.py, which starts the server with tiny models and passes:
//   COMFY_URL, K5_ARTIFACTS (folder for the screenshots), K5_FILES (JSON: the server's model names; dit_renamed is
//   the T2V file under a name that does not say its variant, so detection guesses),
//   K5_WORKFLOW (optional: a bundled UI workflow to load instead of the small graph below), CHROMIUM (executable).
// Exits non-zero with the failed assertion; prints one JSON line of results on success.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const URL = process.env.COMFY_URL;
const ARTIFACTS = process.env.K5_ARTIFACTS;
const F = JSON.parse(process.env.K5_FILES);
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
  "--disable-background-networking", "--disable-component-update", "--no-first-run",
];

// Official numbers, by hand from the authors' configs (not from our variants table):
// k5_lite_t2v_5s_sft_sd.yaml, k5_lite_t2v_5s_distil_sd.yaml, k5_pro_t2v_10s_sft_hd.yaml, k5_lite_t2i_sft_hd.yaml.
const OFFICIAL = {
// NABLA is no sampler widget: the sampler takes it from the model (auto = the variant's; Kandinsky 5 NABLA sets it).
  "t2v-lite-sft-5s": { steps: 50, guidance: 5, scheduler_scale: 10, width: 768, height: 512, length: 121 },
  "t2v-lite-distilled16steps-5s": { steps: 16, guidance: 1, scheduler_scale: 5, length: 121 },
  "t2v-pro-sft-10s-hd": { steps: 50, guidance: 5, scheduler_scale: 10, width: 1280, height: 768, length: 241 },
  "t2i-lite": { steps: 50, guidance: 3.5, scheduler_scale: 3, width: 1024, height: 1024, length: 1 },
};

// A small UI-format workflow (what Load / drag-and-drop take): loaders -> encode -> sampler -> decode -> SaveImage.
function smallWorkflow() {
  const node = (id, type, pos, widgets_values, inputs = [], outputs = []) => ({
    id, type, pos, size: [320, 120], flags: {}, order: id, mode: 0, properties: {}, inputs, outputs, widgets_values,
  });
  const inp = (name, type, link) => ({ name, type, link });
  const out = (name, type, links) => ({ name, type, links, slot_index: 0 });
  return {
    last_node_id: 7, last_link_id: 9, version: 0.4, config: {}, extra: {}, groups: [],
    nodes: [
      node(1, "K5LoadDiT", [20, 40], [F.dit_t2v, "auto", "fp32", "auto"], [], [out("model", "MODEL", [1, 2])]),
      node(2, "K5LoadTextEncoders", [20, 230], [F.qwen, F.clip, "fp32"], [],
        [out("text_encoders", "K5_TEXT_ENCODERS", [3])]),
      node(3, "K5LoadVAE", [20, 400], [F.vae, "fp32"], [], [out("vae", "K5_VAE", [4])]),
      node(4, "K5TextEncode", [380, 40], ["a red fox running through snow", "blurry, low quality", "auto"],
        [inp("text_encoders", "K5_TEXT_ENCODERS", 3), inp("model", "MODEL", 1)],
        [{ ...out("positive", "CONDITIONING", [5]) }, { name: "negative", type: "CONDITIONING", links: [6], slot_index: 1 }]),
      node(5, "K5Sampler", [760, 40], [768, 512, 121, 1, 0, "fixed", 0, -1, 0, "auto", 0, 0, 0, 0],
        [inp("model", "MODEL", 2), inp("positive", "CONDITIONING", 5), inp("negative", "CONDITIONING", 6)],
        [out("latent", "LATENT", [7])]),
      node(6, "K5VAEDecode", [1140, 40], ["auto", 256, 64, 16, 8],
        [inp("vae", "K5_VAE", 4), inp("samples", "LATENT", 7)], [out("IMAGE", "IMAGE", [8])]),
      node(7, "SaveImage", [1140, 300], ["k5_browser"], [inp("images", "IMAGE", 8)], []),
    ],
    links: [
      [1, 1, 0, 4, 1, "MODEL"], [2, 1, 0, 5, 0, "MODEL"], [3, 2, 0, 4, 0, "K5_TEXT_ENCODERS"],
      [4, 3, 0, 6, 0, "K5_VAE"], [5, 4, 0, 5, 1, "CONDITIONING"], [6, 4, 1, 5, 2, "CONDITIONING"],
      [7, 5, 0, 6, 1, "LATENT"], [8, 6, 0, 7, 0, "IMAGE"],
    ],
  };
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS });
const results = {};
try {
  const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  const thumbnailResponses = [];
  page.on("response", (r) => {
    if (/\/workflow_templates\/.+\.(jpg|webp)$/.test(r.url())) thumbnailResponses.push({ url: decodeURIComponent(r.url()), status: r.status() });
  });
  page.on("console", (m) => {
    // the frontend logs each refused prompt (the refusals below are expected, and read as the user reads them)
    if (m.type() === "error" && /kandinsky/i.test(m.text()) && !/^PromptExecutionError/.test(m.text())) pageErrors.push(m.text());
  });
  await page.goto(URL, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(() => window.app?.graph && window.kandinsky5?.state?.data, null, { timeout: 90000 });
  // A first visit opens the template browser over the canvas: close it.
  await page.waitForTimeout(1000);
  for (let i = 0; i < 5 && (await page.$("[role=dialog]")); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
  results.dialog_left_open = !!(await page.$("[role=dialog]"));

  // The template browser: searching "kandinsky" finds the pack's workflows, titled by their file names, each with its
  // own thumbnail (<name>.jpg beside the workflow) loaded.
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  const dialog = page.locator("[role=dialog]").first();
  await dialog.waitFor({ timeout: 20000 });
  await page.waitForTimeout(1500);
  await dialog.getByText("comfyui-kandinsky5", { exact: true }).first().click();
  await page.waitForTimeout(1000);
  const search = dialog.locator("input[type=text], input[type=search], input:not([type])").first();
  await search.fill("kandinsky");
  await page.waitForTimeout(2000);
  const readTemplates = () =>
    page.evaluate(() => {
      const d = document.querySelector("[role=dialog]");
      const imgs = [...d.querySelectorAll("img")];
      return {
        titles: d.innerText.split("\n").filter((l) => /^Kandinsky 5 - \d\d /.test(l)),
        thumbnails: imgs.map((i) => ({ src: decodeURIComponent(i.src), loaded: i.complete && i.naturalWidth > 0 })),
      };
    });
  results.templates = await readTemplates();
  results.templates.responses = thumbnailResponses.slice();
  results.templates_screenshot = path.join(ARTIFACTS, "kandinsky5_template_browser.png");
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: results.templates_screenshot });
  // The listing keeps the server's directory order; the sort menu's alphabetical order follows the numbers.
  await dialog.getByText("Relevance", { exact: true }).first().click();
  await page.waitForTimeout(500);
  results.sort_options = await page.evaluate(() =>
    [...document.querySelectorAll("[role=option], [role=menuitem], li")].map((x) => x.innerText.trim()).filter(Boolean));
  const alpha = page.locator("[role=option], [role=menuitem], li").filter({ hasText: /^\s*A\s*\S?\s*Z\s*$|alphabetic/i }).first();
  if (await alpha.count()) {
    await alpha.click();
    await page.waitForTimeout(1000);
    results.templates_sorted = await readTemplates();
  }
  for (let i = 0; i < 5 && (await page.$("[role=dialog]")); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }

  const workflow = process.env.K5_WORKFLOW ? JSON.parse(fs.readFileSync(process.env.K5_WORKFLOW, "utf8")) : smallWorkflow();
  results.workflow = process.env.K5_WORKFLOW ? path.basename(process.env.K5_WORKFLOW) : "small graph in the test";
  await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
  }, workflow);
  // Fit every node in view, but no smaller than 70 %: below about 60 % LiteGraph draws nodes without text.
  const fitView = () =>
    page.evaluate(() => {
      const c = window.app.canvas;
      const nodes = window.app.graph.nodes;
      const x0 = Math.min(...nodes.map((n) => n.pos[0]));
      const y0 = Math.min(...nodes.map((n) => n.pos[1])) - 40;
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
      const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 80; // room for the warning text
      const { width, height } = c.canvas.getBoundingClientRect();
      const scale = Math.min(1.2, Math.max(0.7, Math.min((width - 160) / (x1 - x0), (height - 160) / (y1 - y0))));
      c.ds.scale = scale;
      c.ds.offset = [width / 2 / scale - (x0 + x1) / 2, height / 2 / scale - (y0 + y1) / 2];
      c.setDirty(true, true);
      c.draw(true, true);
    });
  if (process.env.K5_WORKFLOW) {
    // The bundled workflow names files this server lacks (ComfyUI's hunyuan_video_vae_bf16.safetensors): the frontend
    // reads the loaders' properties.models and lists each missing file with a Download entry. Keep a screenshot.
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    // ComfyUI 0.33's frontend: a toast ("N errors found", View details) opens the errors panel with the missing files.
    const details = page.getByText("View details", { exact: true });
    await details.first().waitFor({ timeout: 15000 }).catch(() => {});
    if (await details.count()) await details.first().click();
    let text = "";
    for (let i = 0; i < 20 && !/hunyuan_video_vae_bf16/.test(text); i++) {
      await page.waitForTimeout(500);
      text = await page.evaluate(() => document.body.innerText);
    }
    results.missing_models = text.split("\n").filter((l) => /safetensors|download|missing/i.test(l)).slice(0, 40);
    results.missing_models_buttons = await page.evaluate(() =>
      [...document.querySelectorAll("button, a")].map((b) => (b.innerText || b.getAttribute("aria-label") || b.title || "").trim())
        .filter((t) => /download/i.test(t)));
    await fitView();
    await page.waitForTimeout(500);
    results.missing_models_screenshot = path.join(ARTIFACTS, "kandinsky5_missing_models.png");
    await page.screenshot({ path: results.missing_models_screenshot });
    for (let i = 0; i < 5 && (await page.$("[role=dialog]")); i++) {
      await page.keyboard.press("Escape");
      await page.waitForTimeout(300);
    }
  }

  // Helpers inside the page: find nodes, set a widget as a user does (value + callback), read widgets back.
  await page.evaluate(() => {
    const find = (type) => window.app.graph.nodes.find((n) => n.type === type);
    const w = (node, name) => node.widgets.find((x) => x.name === name);
    window.__k5 = {
      loader: () => find("K5LoadDiT"),
      sampler: () => find("K5Sampler"),
      set(type, name, value) {
        const node = find(type);
        const widget = w(node, name);
        if (widget.setValue) widget.setValue(value, { node, canvas: window.app.canvas });
        else {
          widget.value = value;
          widget.callback?.(value, window.app.canvas, node);
        }
      },
      read(type) {
        const node = find(type);
        return Object.fromEntries(node.widgets.map((x) => [x.name, x.value]));
      },
    };
  });
  const set = (type, name, value) => page.evaluate(([t, n, v]) => window.__k5.set(t, n, v), [type, name, value]);
  const setAll = async (type, values) => {
    for (const [k, v] of Object.entries(values)) await set(type, k, v);
  };
  const readSampler = () => page.evaluate(() => window.__k5.read("K5Sampler"));
  const warnings = () => page.evaluate(() => {
    const s = window.__k5.sampler();
    window.kandinsky5.refreshSampler(s);
    return { variant: s.k5Variant, warnings: s.k5Warnings, label: s.widgets.find((x) => x.name === "length").label };
  });
  const expectDefaults = (got, name) => {
    for (const [k, v] of Object.entries(OFFICIAL[name])) assert.equal(got[k], v, `${name}: sampler ${k}`);
  };

  if (process.env.K5_WORKFLOW) {
    // Read back what was loaded: the sampler holds the workflow's values, labelled and not flagged.
    const loaded = workflow.nodes.find((n) => n.type === "K5Sampler").widgets_values;
    const s0 = await readSampler();
    assert.deepEqual([s0.width, s0.height, s0.length, s0.steps], [loaded[0], loaded[1], loaded[2], loaded[6]]);
    const w0 = await warnings();
    assert.deepEqual(w0.warnings, [], `the bundled workflow's own settings are flagged: ${w0.warnings}`);
    assert.match(w0.label, new RegExp(`${loaded[2]} frames = ${(loaded[2] / 24).toFixed(1)} s`));
    results.loaded = { sampler: s0, label: w0.label };
  }

  // The bundled files may name models this test server does not have: point the loaders at the tiny ones.
  await setAll("K5LoadTextEncoders", { qwen_name: F.qwen, clip_name: F.clip });
  await setAll("K5LoadVAE", { vae_name: F.vae });
  await set("K5LoadDiT", "variant", "auto");

  // 1. Choosing a DiT file fills the sampler with its (detected) variant's settings.
  await set("K5LoadDiT", "dit_name", F.dit_t2i);
  expectDefaults(await readSampler(), "t2i-lite");
  assert.equal((await warnings()).variant, "t2i-lite");
  await set("K5LoadDiT", "dit_name", F.dit_t2v);
  expectDefaults(await readSampler(), "t2v-lite-sft-5s");
  results.after_dit_choice = await readSampler();

  // 2. Choosing a variant does too; NABLA on with the variant's P for a NABLA-trained HD variant.
  await set("K5LoadDiT", "variant", "t2v-pro-sft-10s-hd");
  expectDefaults(await readSampler(), "t2v-pro-sft-10s-hd");
  let w = await warnings();
  assert.deepEqual(w.warnings, [], `defaults must not be flagged: ${w.warnings}`);
  assert.match(w.label, /241 frames = 10\.0 s/);

  // A variant that does not fit the file is flagged on the loader (the server refuses it when queued).
  await set("K5LoadDiT", "variant", "t2i-lite");
  const loaderFlag = await page.evaluate(() => window.__k5.loader().k5Warnings);
  assert.ok(loaderFlag.some((x) => /variant t2i-lite does not fit kandinsky5lite_t2v_sft_5s/.test(x)), loaderFlag.join("; "));
  await set("K5LoadDiT", "variant", "t2v-pro-sft-10s-hd");
  const edits = () => page.evaluate(() => window.__k5.sampler().properties.k5_user_edited ?? []);
  assert.deepEqual(await edits(), [], "loading a workflow and filling defaults are not user edits");

  // 3. A value the user changed stays when the variant changes; the others follow the variant.
  await set("K5Sampler", "steps", 7);
  await set("K5LoadDiT", "variant", "t2v-lite-distilled16steps-5s");
  let s = await readSampler();
  assert.equal(s.steps, 7, "a user's steps survive a variant change");
  assert.deepEqual(await edits(), ["steps"]);
  assert.equal(s.guidance, 1);
  assert.equal(s.scheduler_scale, 5);
  assert.equal(s.nabla, undefined, "the sampler has no NABLA widget");
  results.user_edit_kept = s;

  // 4. Sizes that do not fit NABLA's 128-px tiles (the variant's NABLA: auto), or the variant's sizes, are flagged.
  await set("K5LoadDiT", "variant", "t2v-pro-sft-10s-hd");
  await set("K5Sampler", "width", 1040);
  w = await warnings();
  assert.ok(w.warnings.some((x) => /NABLA needs multiples of 128 px/.test(x) && /1024 or 1152/.test(x)), w.warnings.join("; "));
  assert.ok(w.warnings.some((x) => /1040x768 is not a t2v-pro-sft-10s-hd size/.test(x)), w.warnings.join("; "));
  await set("K5Sampler", "width", 1024);
  w = await warnings();
  assert.ok(!w.warnings.some((x) => /NABLA/.test(x)), "1024 fits the tiles: no NABLA warning");
  await set("K5Sampler", "width", 1280);
  assert.deepEqual((await warnings()).warnings, []);
  await set("K5Sampler", "length", 121);
  assert.match((await warnings()).label, /121 frames = 5\.0 s/);

  // 4b. The warnings are readable on the canvas and in Vue nodes: inside the node (it grows to hold them), wrapped to
  // its width, on top of whatever is near, gone when nothing is wrong. Each is screenshotted in both modes.
  const setVueNodes = async (on) => {
    await page.evaluate((v) => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", v), on);
    await page.waitForFunction((v) => !!document.querySelector("[data-node-id]") === v, on, { timeout: 20000 });
    await fitView();
    await page.waitForTimeout(700);
  };
  // Where a node's warning box is, against the node's own box (the Vue node element, or the node on the canvas).
  const warningView = (type) =>
    page.evaluate((t) => {
      const node = window.app.graph.nodes.find((n) => n.type === t);
      const el = node.widgets.find((w) => w.name === "k5_warnings")?.element;
      const vueEl = document.querySelector(`[data-node-id="${node.id}"]`);
      let nodeBox;
      if (vueEl) {
        const r = vueEl.getBoundingClientRect();
        nodeBox = { x: r.x, y: r.y, right: r.right, bottom: r.bottom };
      } else {
        const c = window.app.canvas;
        const r = c.canvas.getBoundingClientRect();
        const [sx, sy] = c.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
        const s = c.ds.scale;
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        nodeBox = { x: r.x + sx, y: r.y + sy - title * s, right: r.x + sx + node.size[0] * s, bottom: r.y + sy + node.size[1] * s };
      }
      const out = { warnings: node.k5Warnings, nodeBox, height: node.size[1] };
      if (!el?.isConnected) return out;
      const b = el.getBoundingClientRect();
      const rows = [...el.children].map((row) => {
        const r = row.getBoundingClientRect();
        // every row is the top element at its start, middle and end: nothing covers it
        const covered = [0.02, 0.5, 0.98].filter((f) => {
          const hit = document.elementFromPoint(r.x + r.width * f, r.y + r.height / 2);
          return !(hit && el.contains(hit));
        });
        return { text: row.textContent, top: r.y, bottom: r.bottom, covered };
      });
      return {
        ...out, rows, box: { x: b.x, y: b.y, right: b.right, bottom: b.bottom },
        clipped: el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1,
        visible: getComputedStyle(el).visibility !== "hidden" && b.width > 0 && b.height > 0,
      };
    }, type);
  const readable = async (type, patterns, name, mode) => {
    const v = await warningView(type);
    const where = `${type} (${mode})`;
    assert.ok(v.rows, `${where}: no warning box for ${JSON.stringify(v.warnings)}`);
    assert.equal(v.rows.length, patterns.length, `${where}: ${JSON.stringify(v.rows.map((r) => r.text))}`);
    patterns.forEach((p, i) => assert.match(v.rows[i].text, p, `${where}: warning ${i}`));
    assert.ok(v.visible, `${where}: the warning box is not visible`);
    assert.ok(!v.clipped, `${where}: the warnings overflow their box (not wrapped): ${JSON.stringify(v.box)}`);
    const { box, nodeBox } = v;
    const inside = box.x >= nodeBox.x - 1 && box.right <= nodeBox.right + 1 && box.y >= nodeBox.y - 1
      && box.bottom <= nodeBox.bottom + 1;
    assert.ok(inside, `${where}: the warnings are outside the node: ${JSON.stringify({ box, nodeBox })}`);
    for (const r of v.rows) assert.deepEqual(r.covered, [], `${where}: "${r.text}" is covered at ${r.covered}`);
    const file = path.join(ARTIFACTS, `kandinsky5_warning_${name}_${mode}.png`);
    const pad = 24;
    await page.screenshot({
      path: file,
      clip: {
        x: Math.max(0, nodeBox.x - pad), y: Math.max(0, nodeBox.y - pad),
        width: nodeBox.right - nodeBox.x + 2 * pad, height: nodeBox.bottom - nodeBox.y + 2 * pad,
      },
    });
    (results.warning_screenshots ??= []).push(file);
    return v;
  };
  const gone = async (type, mode) => {
    const v = await warningView(type);
    assert.deepEqual(v.warnings, [], `${type} (${mode})`);
    assert.equal(v.rows, undefined, `${type} (${mode}): a warning box is left with no warning`);
    return v;
  };
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const samplerHeight = (await warningView("K5Sampler")).height;
  await set("K5LoadDiT", "variant", "t2v-pro-sft-10s-hd"); // does not fit the Lite file
  await setAll("K5Sampler", { width: 1040, length: 250 });
  const FIT = [/^\u26A0 variant t2v-pro-sft-10s-hd does not fit kandinsky5lite_t2v_sft_5s\.safetensors: pick auto or one of/];
  // (the widget snaps length 250 to 249)
  const SIZES = [/NABLA needs multiples of 128 px/, /1040x768 is not a t2v-pro-sft-10s-hd size/, /length 249 > 241 frames/];
  const GUESS = [/^\u26A0 my_k5_video\.safetensors: the tensors fit 2 variants .* does not say which: took t2v-lite-sft-5s/];
  await setVueNodes(false);
  await readable("K5LoadDiT", FIT, "loader_variant_does_not_fit", "canvas");
  const grown = await readable("K5Sampler", SIZES, "sampler_size_nabla_length", "canvas");
  assert.ok(grown.height > samplerHeight + 40, `the sampler did not grow for its warnings: ${samplerHeight} -> ${grown.height}`);
  await setVueNodes(true);
  await readable("K5LoadDiT", FIT, "loader_variant_does_not_fit", "vue");
  await readable("K5Sampler", SIZES, "sampler_size_nabla_length", "vue");
  // Changed while in Vue nodes: the guess of a renamed file shows; the sampler's warnings go with their cause.
  await set("K5LoadDiT", "variant", "auto");
  await set("K5LoadDiT", "dit_name", F.dit_renamed);
  await setAll("K5Sampler", { width: 768, length: 121 });
  await page.waitForTimeout(300);
  await readable("K5LoadDiT", GUESS, "loader_guess", "vue");
  await gone("K5Sampler", "vue");
  await setVueNodes(false);
  await readable("K5LoadDiT", GUESS, "loader_guess", "canvas");
  const shrunk = await gone("K5Sampler", "canvas");
  assert.ok(shrunk.height < grown.height - 40, `the sampler kept the warnings' height: ${grown.height} -> ${shrunk.height}`);
  await set("K5LoadDiT", "dit_name", F.dit_t2v);
  await gone("K5LoadDiT", "canvas");

  // 4c. A refused prompt, read as the user reads it (the errors panel, and the inputs marked in Vue nodes): each
  // problem once, under the input it concerns. The server sends every problem under every argument of
  // validate_inputs; js/kandinsky5.js splits them by the input each line names.
  const refusal = async (name) => {
    const posted = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST", { timeout: 60000 });
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    const response = await posted;
    const raw = await response.json();
    assert.equal(response.status(), 400, `${name}: not refused: ${JSON.stringify(raw)}`);
    const details = page.getByText("View details", { exact: true });
    await details.first().waitFor({ timeout: 10000 }).catch(() => {});
    if (await details.count()) await details.first().click();
    const info = page.locator("button[aria-label^='Info for ']");
    await info.first().waitFor({ timeout: 10000 });
    for (const b of await info.all()) if ((await b.getAttribute("aria-expanded")) !== "true") await b.click();
    await page.waitForTimeout(400);
    const shown = await page.evaluate(() =>
      [...document.querySelectorAll("button[aria-label^='Info for ']")].map((b) => ({
        item: b.getAttribute("aria-label").slice("Info for ".length),
        details: document.getElementById(b.getAttribute("aria-controls"))?.innerText ?? "",
      })));
    const file = path.join(ARTIFACTS, `kandinsky5_refusal_${name}.png`);
    await page.screenshot({ path: file });
    (results.refusal_screenshots ??= []).push(file);
    return { raw, shown };
  };
  const closePanel = async () => {
    for (let i = 0; i < 3 && (await page.$("[role=dialog]")); i++) await page.keyboard.press("Escape");
  };
  const titleOf = (type) => page.evaluate((t) => window.app.graph.nodes.find((n) => n.type === t).title, type);
  const loaderTitle = await titleOf("K5LoadDiT");
  const samplerTitle = await titleOf("K5Sampler");

  // The rules on a made-up refusal: a line naming no input stays under every input, a line about an input that got no
  // error of its own (not an argument of validate_inputs) gets one, other nodes' and other kinds of errors are kept.
  const split = await page.evaluate(() => {
    const e = (input, details, type = "custom_validation_failed") =>
      ({ type, message: "m", details: `${input} - ${details}`, extra_info: { input_name: input } });
    const all = "width=1000 must be a multiple of 16\nstart_latent is given but the model is T2V\nsomething else";
    return window.kandinsky5.splitRefusal({
      1: { class_type: "K5Sampler", errors: [e("width", all), e("guidance", all), e("seed", "x", "value_bigger_than_max")] },
      2: { class_type: "KSampler", errors: [e("cfg", "a\nb"), e("seed", "a\nb")] },
    });
  });
  assert.deepEqual(split[1].errors.map((x) => [x.extra_info.input_name, x.details]), [
    ["width", "width - width=1000 must be a multiple of 16\nsomething else"],
    ["guidance", "guidance - something else"],
    ["seed", "seed - x"],
    ["start_latent", "start_latent - start_latent is given but the model is T2V"],
  ]);
  assert.equal(split[2].errors.length, 2, "another pack's node is left as it is");

  // (a) A variant that does not fit the file: refused by Load Kandinsky 5 DiT, one item, said once.
  await set("K5LoadDiT", "variant", "t2i-lite");
  let r = await refusal("loader_variant_does_not_fit");
  const loaderId = await page.evaluate(() => String(window.__k5.loader().id));
  const rawLoader = r.raw.node_errors[loaderId].errors;
  assert.ok(rawLoader.length >= 2, `the server sent one error per argument: ${JSON.stringify(rawLoader)}`);
  let items = r.shown.filter((x) => x.item.startsWith(`${loaderTitle} - `));
  assert.deepEqual(items.map((x) => x.item), [`${loaderTitle} - variant`], `the loader's one problem, once: ${JSON.stringify(r.shown)}`);
  assert.match(items[0].details, /variant 't2i-lite' does not fit 'kandinsky5lite_t2v_sft_5s\.safetensors'/);
  assert.equal(r.shown.map((x) => x.details).join("\n").match(/does not fit/g).length, 1, JSON.stringify(r.shown));
  results.refusal_loader = r.shown;
  await closePanel();
  await set("K5LoadDiT", "variant", "auto");

  // (b) A graph refusal: an image DiT whose samples Kandinsky 5 VAE Decode would decode with the HunyuanVideo VAE (the
  // node sees it only through its links in the queued graph). Once, under vae.
  await set("K5LoadDiT", "dit_name", F.dit_t2i);
  const decodeTitle = await titleOf("K5VAEDecode");
  const decodeId = await page.evaluate(() => String(window.app.graph.nodes.find((n) => n.type === "K5VAEDecode").id));
  r = await refusal("image_dit_with_video_vae");
  assert.ok(r.raw.node_errors[decodeId]?.errors.length >= 2, `one error per argument: ${JSON.stringify(r.raw)}`);
  items = r.shown.filter((x) => x.item.startsWith(`${decodeTitle} - `));
  assert.deepEqual(items.map((x) => x.item), [`${decodeTitle} - vae`], JSON.stringify(r.shown));
  assert.match(items[0].details, /vae: HunyuanVideo\/vae\/ is the HunyuanVideo VAE .* kandinsky5lite_t2i\.safetensors, a t2i-lite model made for the FLUX VAE/);
  results.refusal_graph = items;
  await closePanel();
  await set("K5LoadDiT", "dit_name", F.dit_t2v);

  // (c) A sampler with three problems: width, height and length each under its own input, once.
  const samplerId = await page.evaluate(() => String(window.__k5.sampler().id));
  // Values off the widgets' steps, as a workflow written elsewhere holds them (the widgets snap what a user types).
  await page.evaluate(() => {
    const s = window.__k5.sampler();
    for (const [k, v] of Object.entries({ width: 1000, height: 520, length: 130 })) s.widgets.find((w) => w.name === k).value = v;
  });
  r = await refusal("sampler_three_problems");
  const rawSampler = r.raw.node_errors[samplerId].errors;
  assert.ok(rawSampler.length > 3 && rawSampler.every((e) => /width=1000/.test(e.details) && /length=130/.test(e.details)),
    `the server sends every problem under every argument: ${JSON.stringify(rawSampler)}`);
  items = r.shown.filter((x) => x.item.startsWith(`${samplerTitle} - `));
  assert.deepEqual(items.map((x) => x.item.slice(samplerTitle.length + 3)).sort(), ["height", "length", "width"], JSON.stringify(r.shown));
  const problem = {
    width: /width=1000 must be a multiple of 16/, height: /height=520 must be a multiple of 16/,
    length: /length=130 frames must be 4k\+1/,
  };
  for (const x of items) {
    const input = x.item.slice(samplerTitle.length + 3);
    for (const [k, re] of Object.entries(problem)) {
      assert.equal(re.test(x.details), k === input, `${x.item}: ${k === input ? "misses" : "repeats"} the ${k} problem: ${x.details}`);
    }
  }
  results.refusal_sampler = items;
  // In Vue nodes the refused inputs are marked on the node: exactly those three.
  await closePanel();
  await setVueNodes(true);
  const marked = await page.evaluate((id) =>
    [...document.querySelectorAll(`[data-node-id="${id}"] .text-node-stroke-error`)]
      .map((e) => e.innerText.trim().split(/\s/)[0]), samplerId);
  assert.deepEqual(marked.sort(), ["height", "length", "width"], `inputs marked as refused: ${marked}`);
  await page.screenshot({ path: path.join(ARTIFACTS, "kandinsky5_refusal_sampler_three_problems_vue.png") });
  results.refusal_screenshots.push(path.join(ARTIFACTS, "kandinsky5_refusal_sampler_three_problems_vue.png"));
  await setVueNodes(false);

  // 5. Back to the runnable tiny T2V model at a tiny size: flagged (not a trained size) but queued anyway.
  await set("K5LoadDiT", "variant", "auto");
  await setAll("K5Sampler", { width: 96, height: 64, length: 5, steps: 2 });
  w = await warnings();
  assert.equal(w.variant, "t2v-lite-sft-5s");
  assert.ok(w.warnings.some((x) => /96x64 is not a t2v-lite-sft-5s size/.test(x)), w.warnings.join("; "));
  results.flag_at_queue = w;

  // Fit the graph in view and keep a screenshot of the canvas (the flag is drawn under the sampler).
  await fitView();
  await page.waitForTimeout(500);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  results.screenshot = path.join(ARTIFACTS, "kandinsky5_canvas.png");
  const clip = await page.evaluate(() => {
    const r = window.app.canvas.canvas.getBoundingClientRect();
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  });
  await page.screenshot({ path: results.screenshot, clip });

  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  const sampler = Object.values(prompt).find((n) => n.class_type === "K5Sampler");
  assert.equal(sampler.inputs.steps, 2);
  assert.equal(sampler.inputs.width, 96);
  if (process.env.K5_WORKFLOW) {
    // The bundled Prompt Expansion feeds Text Encode's prompt (a widget with a link): the frontend queues the link.
    const id = (type) => Object.keys(prompt).find((k) => prompt[k].class_type === type);
    const expansion = id("K5PromptExpansion");
    assert.ok(expansion, "the queued bundled workflow has no K5PromptExpansion");
    assert.deepEqual(prompt[id("K5TextEncode")].inputs.prompt, [expansion, 0]);
    assert.equal(prompt[expansion].inputs.expand, true);
    results.expansion = prompt[expansion].inputs;
  }

  const posted = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST", {
    timeout: 60000,
  });
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  const response = await posted;
  const body = await response.json();
  assert.equal(response.status(), 200, `POST /prompt: ${JSON.stringify(body)}`);
  assert.ok(body.prompt_id, JSON.stringify(body));
  results.prompt_id = body.prompt_id;
  results.page_errors = pageErrors;
  assert.deepEqual(pageErrors, [], "errors in the page");
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
