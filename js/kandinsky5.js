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

const state = { data: null, loading: false, pending: null, neutral: {} }; // neutral: the sampler's schema defaults

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
  loader.k5Warnings = [loaderProblem(loader)].filter(Boolean);
  loader.setDirtyCanvas?.(true, true);
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
  if (redraw) sampler.setDirtyCanvas?.(true, true);
}

function drawWarnings(node, ctx) {
  const lines = node.k5Warnings;
  if (!lines?.length || node.flags?.collapsed) return;
  const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.strokeStyle = WARN_COLOR;
  ctx.lineWidth = 3;
  ctx.strokeRect(-3, -titleH - 3, node.size[0] + 6, node.size[1] + titleH + 6);
  ctx.fillStyle = WARN_COLOR;
  ctx.font = "bold 13px sans-serif";
  lines.forEach((line, i) => ctx.fillText(`\u26A0 ${line}`, 0, node.size[1] + 20 + 17 * i));
  ctx.restore();
}

function rememberLoaders() {
  for (const node of app.graph?.nodes ?? []) {
    if (node.type === LOADER) {
      node.k5LastVariant = loaderVariant(node)?.name ?? null;
      node.k5Warnings = [loaderProblem(node)].filter(Boolean);
    }
    if (node.type === SAMPLER) refreshSampler(node);
  }
}

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
    if (nodeData.name !== LOADER && nodeData.name !== SAMPLER) return;
    chainCallback(nodeType.prototype, "onDrawForeground", function (ctx) {
      // recomputed every frame: catches values set without a callback (cheap: a few comparisons)
      if (this.type === SAMPLER) refreshSampler(this, false);
      else this.k5Warnings = [loaderProblem(this)].filter(Boolean);
      drawWarnings(this, ctx);
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
window.kandinsky5 = { state, fetchVariants, loaderVariant, samplerWarnings, fillFromLoader, refreshSampler };
