// Kandinsky 5 front end: the sampler follows the loaded DiT's variant, shows length in seconds, and flags sizes
// the variant cannot make before the prompt is queued (the server validates again; nothing here blocks queueing).
// The numbers come from GET /kandinsky5/variants (nodes/web_api.py), i.e. kandinsky_core/variants.py.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LOADER = "K5LoadDiT";
const SAMPLER = "K5Sampler";
// Sampler widgets the loader fills with the variant's values, unless the user changed them.
const FILLED = ["width", "height", "length", "steps", "guidance", "scheduler_scale"];
// Nodes a model passes through on its way to the sampler (LoRA and options: a clone of the model, same variant).
const PASS_THROUGH = ["K5LoadLoRA", "K5MagCache", "K5MagCacheCalibrate", "K5Compile", "K5Nabla"];
const NABLA = "K5Nabla";
const EDITED = "k5_user_edited"; // node property: widgets the user changed, kept in the saved workflow
const FILLED_FROM = "k5_filled_from"; // node property: the variant whose values were filled last
const WARN_COLOR = "#e5484d";
// The warnings live in a read-only DOM widget inside the node: the 1.49 frontend shows DOM widgets on the LiteGraph
// canvas and in Vue nodes (where onDrawForeground draws nothing), and the node grows to hold them.
const WARN_WIDGET = "k5_warnings";
const WARN_FONT = "bold 12px/1.35 sans-serif";
const WARN_PADDING = 4; // px inside the box, each side
const WARN_MARGIN = 6; // px around the box
const WIDGET_GAP = 4; // what LiteGraph puts between widgets
const GROWN = "k5_warnings_height"; // node property: the height the warning box added to the node

// neutral: the sampler's schema defaults; inputs: each K5 node's input names (for splitRefusal)
const state = { data: null, loading: false, pending: null, neutral: {}, inputs: {} };

async function fetchVariants() {
  if (!state.pending) {
    state.pending = api
      .fetchApi("/kandinsky5/variants")
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then((data) => (state.data = data))
      .catch((e) => console.warn("[Kandinsky 5] could not read /kandinsky5/variants:", e))
      .finally(() => (state.pending = null));
  }
  return state.pending;
}

const widget = (node, name) => node.widgets?.find((w) => w.name === name);
const value = (node, name) => widget(node, name)?.value;

function upstream(node, inputName) {
  const slot = node.findInputSlot ? node.findInputSlot(inputName) : node.inputs?.findIndex((i) => i.name === inputName);
  let src = slot >= 0 ? node.getInputNode(slot) : null;
  for (let hops = 0; src && src.type === "Reroute" && hops < 16; hops++) src = src.getInputNode(0);
  return src;
}

/** The loader a model input comes from (through reroutes, LoRA and option nodes) and the NABLA mode of the
 * Kandinsky 5 NABLA node nearest the sampler on the way ("auto" without one: the variant's). */
function modelSource(node, inputName = "model") {
  let src = upstream(node, inputName);
  let nabla = null;
  for (let hops = 0; src && PASS_THROUGH.includes(src.type) && hops < 32; hops++) {
    if (src.type === NABLA && nabla === null) nabla = value(src, "mode") ?? "auto";
    src = upstream(src, "model");
  }
  return { loader: src, nabla: nabla ?? "auto" };
}

function downstreamSamplers(loader) {
  const out = [];
  const walk = (node, slot, depth) => {
    for (const target of node.getOutputNodes?.(slot) ?? []) {
      if (target.type === SAMPLER) out.push(target);
      else if ((target.type === "Reroute" || PASS_THROUGH.includes(target.type)) && depth < 32) walk(target, 0, depth + 1);
    }
  };
  walk(loader, 0, 0);
  return out;
}

/** The variant a loader node stands for: its override, or what its DiT file was detected as. */
function loaderVariant(loader) {
  const d = state.data;
  if (!d || !loader) return null;
  const choice = value(loader, "variant");
  if (choice && choice !== "auto") return d.variants[choice] ?? null;
  const file = d.files[value(loader, "dit_name")];
  return file?.variant ? d.variants[file.variant] ?? null : null;
}

function loaderProblem(loader) {
  const name = value(loader, "dit_name");
  const file = state.data?.files[name];
  const choice = value(loader, "variant");
  if (!file) return null;
  if (!file.variant) return `${name}: ${file.error}`;
  if (choice !== "auto" && !file.fits.includes(choice)) {
    return `variant ${choice} does not fit ${name}: pick auto or one of ${file.fits.join(", ")}`;
  }
  // auto had to guess between variants with the same tensors (the file name does not say which)
  if (choice === "auto" && file.guess) return `${name}: ${file.guess}`;
  return null;
}

function edited(node) {
  node.properties ??= {};
  node.properties[EDITED] ??= [];
  return node.properties[EDITED];
}

/** Fill a sampler's widgets with the variant's defaults, skipping widgets the user changed. */
function fillSampler(sampler, variant, previousName = null) {
  const mine = edited(sampler);
  const previous = state.data?.variants[sampler.properties?.[FILLED_FROM] ?? previousName]?.defaults;
  for (const name of FILLED) {
    const w = widget(sampler, name);
    if (!w || mine.includes(name)) continue;
    // A value loaded from a workflow that is neither the widget's neutral default nor the previous variant's
    // is a user's choice too.
    if (previous && w.value !== previous[name] && w.value !== state.neutral[name]) continue;
    w.value = variant.defaults[name];
  }
  sampler.properties[FILLED_FROM] = variant.name;
  refreshSampler(sampler);
}

function fillFromLoader(loader) {
  const v = loaderVariant(loader);
  if (v) for (const s of downstreamSamplers(loader)) fillSampler(s, v, loader.k5LastVariant);
  loader.k5LastVariant = v?.name ?? null;
  refreshLoader(loader);
}

function refreshLoader(loader) {
  loader.k5Warnings = [loaderProblem(loader)].filter(Boolean);
  showWarnings(loader);
}

const sizeList = (v) => v.resolutions.map(([w, h]) => `${w}x${h}`).join(", ");

function nearestMultiples(x, m) {
  const lo = Math.max(m, Math.floor(x / m) * m);
  const hi = Math.max(m, Math.ceil(x / m) * m);
  return lo === hi ? `${lo}` : `${lo} or ${hi}`;
}

/** What is wrong with the sampler's size and length for its variant (strings; empty when nothing is). */
export function samplerWarnings(sampler, v, d = state.data, mode = "auto") {
  const width = value(sampler, "width");
  const height = value(sampler, "height");
  const length = value(sampler, "length");
  const tile = d?.nabla_tile_px ?? 128;
  const out = [];
  const nablaOn = mode === "on" || (mode === "auto" && !!v?.nabla);
  if (nablaOn && (width % tile || height % tile)) {
    const bad = width % tile ? ["width", width] : ["height", height];
    out.push(`${bad[0]} ${bad[1]}: NABLA needs multiples of ${tile} px (nearest ${nearestMultiples(bad[1], tile)}), or Kandinsky 5 NABLA off`);
  }
  const fromLatent = width === 0 && height === 0; // the sampler takes the input latent's size
  if (v) {
    const trained = v.resolutions.some(([w, h]) => w === width && h === height);
    if (!trained && !fromLatent && !v.i2v_max_area) out.push(`${width}x${height} is not a ${v.name} size: ${sizeList(v)}`);
    if (v.is_video && length > v.max_frames) out.push(`length ${length} > ${v.max_frames} frames (${v.name})`);
    if (!v.is_video && length !== 1) out.push(`${v.name} makes images: length must be 1`);
  }
  if (length > 1 && (length - 1) % 4) out.push(`length ${length} is not 4k+1 frames`);
  return out;
}

function refreshSampler(sampler, redraw = true) {
  const fps = state.data?.fps ?? 24;
  const len = widget(sampler, "length");
  if (len) {
    const label = len.value === 1 ? "length (1 frame = image)" : `length (${len.value} frames = ${(len.value / fps).toFixed(1)} s)`;
    len.label = label;
    len.tooltip = `${label} at ${fps} fps. Frames are 4k+1: 121 = 5 s, 241 = 10 s.`;
  }
  const source = modelSource(sampler);
  const v = loaderVariant(source.loader);
  sampler.k5Variant = v?.name ?? null;
  sampler.k5Warnings = samplerWarnings(sampler, v, state.data, source.nabla);
  showWarnings(sampler);
  if (redraw) sampler.setDirtyCanvas?.(true, true);
}

function fillWarnings(el, lines) {
  el.replaceChildren(
    ...lines.map((line) => {
      const row = document.createElement("div");
      row.textContent = `\u26A0 ${line}`;
      return row;
    }),
  );
}

function warningBox() {
  const el = document.createElement("div");
  el.dataset.k5Warnings = "";
  el.setAttribute("role", "status");
  Object.assign(el.style, {
    boxSizing: "border-box", padding: `${WARN_PADDING}px ${WARN_PADDING + 2}px`, font: WARN_FONT, color: WARN_COLOR,
    background: "rgba(229, 72, 77, 0.12)", border: `1px solid ${WARN_COLOR}`, borderLeftWidth: "4px",
    borderRadius: "4px",
    whiteSpace: "normal", overflowWrap: "anywhere", overflow: "hidden", cursor: "text", userSelect: "text",
    // the frontend makes DOM widgets fill their slot, which in a Vue node is any height the node has to spare
    flex: "0 0 auto", height: "auto",
  });
  return el;
}

let measurer = null;
const measured = new Map();

/** Height in px of the warning box at `width` px: laid out by the browser in a hidden copy, so it wraps exactly as
 * the box does (the canvas mode sizes DOM widgets from this, before the box itself is laid out). */
function boxHeight(lines, width) {
  const key = `${Math.round(width)}\n${lines.join("\n")}`;
  if (!measured.has(key)) {
    if (!measurer) {
      measurer = warningBox();
      delete measurer.dataset.k5Warnings;
      Object.assign(measurer.style, { position: "fixed", left: "-10000px", top: "0", visibility: "hidden" });
      document.body.append(measurer);
    }
    measurer.style.width = `${Math.max(40, Math.round(width))}px`;
    fillWarnings(measurer, lines);
    if (measured.size > 200) measured.clear();
    measured.set(key, Math.ceil(measurer.getBoundingClientRect().height));
  }
  return measured.get(key);
}

/** Show node.k5Warnings in the node (a DOM widget, added with the first warning and removed with the last); the
 * node grows by the box's height and shrinks back. */
function showWarnings(node) {
  // while a workflow loads, its saved size is yet to come: afterConfigureGraph shows them
  if (state.loading) return;
  const lines = node.k5Warnings ?? [];
  const text = lines.join("\n");
  if (text === (node.k5Shown ?? "")) return;
  node.k5Shown = text;
  let w = widget(node, WARN_WIDGET);
  if (!lines.length) {
    if (w) node.removeWidget(w);
    w = null;
  } else if (!w) {
    const height = () => boxHeight(node.k5Warnings ?? [], node.size[0] - 2 * WARN_MARGIN) + 2 * WARN_MARGIN;
    w = node.addDOMWidget(WARN_WIDGET, WARN_WIDGET, warningBox(), {
      serialize: false, hideOnZoom: false, margin: WARN_MARGIN, getMinHeight: height, getMaxHeight: height,
    });
    w.serialize = false; // not in the saved workflow's widgets_values either
  }
  if (w) fillWarnings(w.element, lines);
  // The height the box added is kept in the node's properties: a workflow saved with warnings has it in its size.
  node.properties ??= {};
  const before = node.properties[GROWN] ?? 0;
  const after = w ? w.computeLayoutSize().minHeight + WIDGET_GAP : 0;
  if (after) node.properties[GROWN] = after;
  else delete node.properties[GROWN];
  // A Vue node grows around its content by itself, but keeps a height it was given.
  if (!globalThis.LiteGraph?.vueNodesMode || after < before) {
    node.setSize([node.size[0], Math.max(node.computeSize()[1], node.size[1] + after - before)]);
  }
  // a grown node drawn under the next node down would hide its new lines
  if (after > before && app.canvas?.graph === node.graph) app.canvas.bringToFront(node);
  node.setDirtyCanvas?.(true, true);
}

/** The red outline of a node with warnings on the LiteGraph canvas (in Vue nodes the box alone is red). */
function drawOutline(node, ctx) {
  if (!node.k5Warnings?.length || node.flags?.collapsed) return;
  const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.strokeStyle = WARN_COLOR;
  ctx.lineWidth = 3;
  ctx.strokeRect(-3, -titleH - 3, node.size[0] + 6, node.size[1] + titleH + 6);
  ctx.restore();
}

function rememberLoaders() {
  for (const node of app.graph?.nodes ?? []) {
    if (node.type === LOADER) {
      node.k5LastVariant = loaderVariant(node)?.name ?? null;
      refreshLoader(node);
    }
    if (node.type === SAMPLER) refreshSampler(node);
  }
}

function refreshAll() {
  if (state.loading) return;
  for (const node of app.graph?.nodes ?? []) {
    if (node.type === LOADER) refreshLoader(node);
    if (node.type === SAMPLER) refreshSampler(node);
  }
}

/** ComfyUI turns a string from a node's validate_inputs into one error per argument of validate_inputs, each with
 * the whole string ("<input> - <every problem>"). Our nodes write one problem a line, each line starting with the
 * input it concerns: keep each line under that input only (an error left with no line goes). A line that names no
 * input of the node stays under every one; a line about an input with no error of its own gets one. Rewrites
 * `nodeErrors` (a /prompt response's node_errors) in place and returns it. */
export function splitRefusal(nodeErrors, inputsOf = (classType) => state.inputs[classType] ?? []) {
  for (const entry of Object.values(nodeErrors ?? {})) {
    if (!entry?.class_type?.startsWith("K5") || !Array.isArray(entry.errors)) continue;
    const whole = (e) => {
      const name = e.extra_info?.input_name;
      return e.type === "custom_validation_failed" && name && e.details?.startsWith(`${name} - `);
    };
    const split = entry.errors.filter(whole);
    if (!split.length) continue;
    const names = new Set([...inputsOf(entry.class_type), ...split.map((e) => e.extra_info.input_name)]);
    const owner = (line) => {
      const m = /^\s*([A-Za-z_]\w*)/.exec(line);
      return m && names.has(m[1]) ? m[1] : null;
    };
    const errors = [];
    const orphans = new Map(); // input -> its lines, for inputs that got no error of their own
    for (const e of entry.errors) {
      if (!split.includes(e)) {
        errors.push(e);
        continue;
      }
      const name = e.extra_info.input_name;
      const lines = e.details.slice(name.length + 3).split("\n").filter((l) => l.trim());
      const kept = lines.filter((l) => [name, null].includes(owner(l)));
      if (kept.length) errors.push({ ...e, details: `${name} - ${kept.join("\n")}` });
      for (const l of lines) {
        const o = owner(l);
        if (o && !split.some((x) => x.extra_info.input_name === o)) {
          if (!orphans.has(o)) orphans.set(o, new Set());
          orphans.get(o).add(l);
        }
      }
    }
    for (const [name, lines] of orphans) {
      const extra_info = { ...split[0].extra_info, input_name: name };
      errors.push({ ...split[0], details: `${name} - ${[...lines].join("\n")}`, extra_info });
    }
    entry.errors = errors;
  }
  return nodeErrors;
}

// The frontend reads a refusal from api.queuePrompt: its 400 throws an error carrying response.node_errors (then the
// app records them and opens its errors panel); a 200 may carry node_errors of outputs left out.
const queuePrompt = api.queuePrompt;
api.queuePrompt = async function (...args) {
  let response;
  try {
    response = await queuePrompt.apply(this, args);
  } catch (e) {
    splitRefusal(e?.response?.node_errors);
    throw e;
  }
  splitRefusal(response?.node_errors);
  return response;
};

function trackEdits(node, names) {
  for (const name of names) {
    const w = widget(node, name);
    if (!w) continue;
    const original = w.callback;
    w.callback = function (...args) {
      if (!state.loading) {
        const mine = edited(node);
        if (!mine.includes(name)) mine.push(name);
      }
      const r = original?.apply(this, args);
      refreshSampler(node);
      return r;
    };
  }
}

function chainCallback(obj, key, fn) {
  const original = obj[key];
  obj[key] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

app.registerExtension({
  name: "kandinsky5.defaults",

  async setup() {
    // Vue nodes draw no foreground: follow every change of the graph (widget values, links) there too.
    api.addEventListener("graphChanged", refreshAll);
    await fetchVariants();
    rememberLoaders();
  },

  beforeConfigureGraph() {
    state.loading = true;
  },

  afterConfigureGraph() {
    state.loading = false;
    rememberLoaders();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name.startsWith("K5")) {
      const { required, optional } = nodeData.input ?? {};
      state.inputs[nodeData.name] = [...Object.keys(required ?? {}), ...Object.keys(optional ?? {})];
    }
    if (nodeData.name !== LOADER && nodeData.name !== SAMPLER) return;
    chainCallback(nodeType.prototype, "onDrawForeground", function (ctx) {
      // recomputed every frame: catches values set without a callback (cheap: a few comparisons)
      if (this.type === SAMPLER) refreshSampler(this, false);
      else refreshLoader(this);
      drawOutline(this, ctx);
    });
    if (nodeData.name === SAMPLER) {
      for (const [name, spec] of Object.entries(nodeData.input?.required ?? {})) state.neutral[name] = spec[1]?.default;
      chainCallback(nodeType.prototype, "onNodeCreated", function () {
        trackEdits(this, FILLED);
        refreshSampler(this);
      });
      chainCallback(nodeType.prototype, "onConnectionsChange", function (type, slot, connected) {
        if (state.loading || type !== globalThis.LiteGraph?.INPUT) return;
        if (this.inputs?.[slot]?.name !== "model") return;
        const v = connected ? loaderVariant(modelSource(this).loader) : null;
        if (v) fillSampler(this, v);
        else refreshSampler(this);
      });
      return;
    }
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      for (const name of ["dit_name", "variant"]) {
        const w = widget(this, name);
        if (!w) continue;
        const original = w.callback;
        const loader = this;
        w.callback = function (...args) {
          const r = original?.apply(this, args);
          if (state.loading) return r;
          const known = state.data?.files[value(loader, "dit_name")];
          if (known) fillFromLoader(loader);
          else fetchVariants().then(() => fillFromLoader(loader)); // a file added since the page loaded
          return r;
        };
      }
    });
  },
});

// For tests and other extensions: the data and the functions above, read-only use.
window.kandinsky5 = {
  state, fetchVariants, loaderVariant, samplerWarnings, fillFromLoader, refreshSampler, splitRefusal,
};
