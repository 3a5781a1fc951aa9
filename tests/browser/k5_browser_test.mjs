// Headless-Chromium test of js/kandinsky5.js on the real ComfyUI frontend served by a running ComfyUI.
// Run by tests/integration/test_browser.py, which starts the server with tiny models and passes:
//   COMFY_URL, K5_ARTIFACTS (folder for the screenshot), K5_FILES (JSON: the server's model names),
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
  page.on("console", (m) => m.type() === "error" && /kandinsky/i.test(m.text()) && pageErrors.push(m.text()));
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
