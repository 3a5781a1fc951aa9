"""ComfyUI workflows as data: UI format -> API format (what POST /prompt takes), and `queue --set`-style overrides.

The conversion works against the server's /object_info, as ComfyUI's frontend does when it queues; the bundled API
twins (scripts/make_workflows.py) are made with it too. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from kandinsky_core.errors import InputError

FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")  # never sent to the server
MUTED, BYPASSED = 2, 4  # UI node modes
EXPORT_HINT = "In ComfyUI, save the workflow with Export (API) and queue that file instead."
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# ---------------------------------------------------------------- UI format -> API format


def is_api_workflow(workflow: dict) -> bool:
    """API format: {node_id: {"class_type", "inputs"}}; UI format has "nodes" and "links"."""
    return bool(workflow) and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def _input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's required then optional inputs, in the order the frontend shows them."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(inputs.get(k, {})) for k in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is None:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, opts))
    return specs


def _is_widget(kind: object, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _adds_widget(name: str, kind: object, opts: dict) -> bool:
    """Whether the frontend adds a widget of its own (its value is serialised too) right after this one: "control
    after generate" after INT widgets with control_after_generate, or, when the option is absent, named seed /
    noise_seed, and after FLOAT widgets with it; an upload button after file combos."""
    if kind == "INT":
        flag = opts.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    if kind == "FLOAT":
        return bool(opts.get("control_after_generate"))
    if opts.get("control_after_generate"):
        raise InputError(f"input {name!r}: combo widgets with control_after_generate are not supported by queue.")
    # a file combo (LoadImage's image_upload, video_upload, ...) gets an upload button whose value is serialised
    return any(key.endswith("_upload") and flag for key, flag in opts.items())


def widget_names(info: dict) -> list[str | None]:
    """Names of the values in a UI node's widgets_values, in order; None marks a value of a frontend-added widget."""
    names: list[str | None] = []
    for name, kind, opts in _input_specs(info):
        if _is_widget(kind, opts):
            names.append(name)
            if _adds_widget(name, kind, opts):
                names.append(None)
    return names


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
_END = object()


def _option_specs(inputs: dict) -> list[tuple[str, object, dict]]:
    return _input_specs({"input": inputs})


def _dynamic_widget_inputs(specs: list, values: Iterator, out: dict, prefix: str = "") -> None:
    """Widget values of a node with V3 dynamic combos, as the frontend serialises them: each combo's choice, then
    the widgets of the chosen option; API names are dotted paths (format, format.codec), as ComfyUI expects them.
    Hidden inputs have no widget."""
    for name, kind, opts in specs:
        if opts.get("hidden") or not (kind == DYNAMIC_COMBO or _is_widget(kind, opts)):
            continue
        value = next(values, _END)
        if value is _END:
            return
        out[prefix + name] = value
        if kind == DYNAMIC_COMBO:
            chosen = next((o for o in opts.get("options", []) if o.get("key") == value), None)
            if chosen is not None:
                _dynamic_widget_inputs(_option_specs(chosen.get("inputs", {})), values, out, f"{prefix}{name}.")
        elif _adds_widget(name, kind, opts):
            next(values, None)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API format, as ComfyUI's frontend does when it queues.

    Frontend-only nodes (Note, Reroute, PrimitiveNode) are dropped, muted nodes too; links through Reroute and
    bypassed nodes are followed to their source. A node type the server lacks raises InputError naming it."""
    if not isinstance(ui.get("nodes"), list) or not isinstance(ui.get("links", []), list):
        raise InputError("the workflow has no 'nodes' list: it is neither a UI-format nor an API-format workflow.")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):  # newer serialisation of links
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"]]
        links[link[0]] = (link[1], link[2])

    def source(link_id: int, depth: int = 0) -> list | None:
        if link_id not in links or depth > 100:
            return None
        node_id, slot = links[link_id]
        node = nodes.get(node_id)
        if node is None:
            return None
        if node.get("type") == "Reroute" or node.get("mode") == BYPASSED:
            outputs = node.get("outputs") or []
            out_type = outputs[slot].get("type") if slot < len(outputs) else None
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node.get("type") == "Reroute" or inp.get("type") == out_type):
                    return source(inp["link"], depth + 1)
            return None
        if node.get("type") in FRONTEND_ONLY or node.get("mode") == MUTED:
            return None
        return [str(node_id), slot]

    subgraphs = {g.get("id"): g.get("name", "") for g in (ui.get("definitions") or {}).get("subgraphs", [])}
    api: dict = {}
    for node in sorted(ui["nodes"], key=lambda n: n.get("order", 0)):
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind in subgraphs:
            raise InputError(
                f"node {node['id']} is a subgraph ({subgraphs[kind] or kind}), which queue cannot expand. {EXPORT_HINT}"
            )
        info = object_info.get(kind)
        if info is None:
            raise InputError(
                f"node {node['id']} is a {kind!r}, which this ComfyUI does not have. Install the custom node pack "
                "that provides it (or update ComfyUI), then queue again."
            )
        dynamic = any(k == DYNAMIC_COMBO for _, k, _ in _input_specs(info))
        inputs: dict = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some packs serialise widgets by name
            inputs.update({k: v for k, v in values.items() if k in {s[0] for s in _input_specs(info)}})
        elif dynamic:
            _dynamic_widget_inputs(_input_specs(info), iter(values), inputs)
        else:
            for name, value in zip(widget_names(info), values, strict=False):
                if name is not None:
                    inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is not None:
                inputs[inp["name"]] = src
            elif inp.get("widget") is None:
                inputs.pop(inp["name"], None)
        title = node.get("title") or info.get("display_name") or kind
        api[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return api


# ---------------------------------------------------------------- overrides


def parse_set(item: str) -> tuple[str, str, str]:
    """ "NODE.INPUT=VALUE" -> (node, input, raw value). NODE is an id, a title or a class type."""
    target, sep, value = item.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise InputError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set K5Sampler.steps=20 or 5.seed=7.")
    return node, name, value


def _coerce(raw: str, current: object) -> object:
    """Keep strings strings (file names like "1.safetensors"); parse numbers, booleans and JSON otherwise."""
    if isinstance(current, str):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def find_nodes(api: dict, key: str) -> list[str]:
    """Node ids matching `key`: the id itself, else every node whose title or class type is `key`."""
    if key in api:
        return [key]
    by_title = [i for i, n in api.items() if n.get("_meta", {}).get("title") == key]
    return by_title or [i for i, n in api.items() if n.get("class_type") == key]


def set_input(api: dict, node: str, name: str, raw: str | object, parse: bool = True) -> list[str]:
    """Set input `name` on every node matching `node`; InputError naming the choices when nothing matches."""
    ids = find_nodes(api, node)
    if not ids:
        choices = ", ".join(f"{i} ({n['class_type']})" for i, n in api.items())
        raise InputError(f"--set {node}.{name}: no node has id, title or type {node!r}. Nodes: {choices}.")
    for i in ids:
        inputs = api[i]["inputs"]
        if name not in inputs:
            have = ", ".join(k for k, v in inputs.items() if not isinstance(v, list))
            raise InputError(
                f"--set {node}.{name}: node {i} ({api[i]['class_type']}) has no input {name!r}. Its inputs: {have}."
            )
        if isinstance(inputs.get(name), list):
            raise InputError(f"--set {node}.{name}: input {name!r} of node {i} is connected to another node.")
        inputs[name] = _coerce(raw, inputs.get(name)) if parse and isinstance(raw, str) else raw
    return ids


def _text_holder(api: dict, node: str, name: str) -> tuple[str, str]:
    """The node and input that hold the text of input `name` of `node`: itself, or, up the links, the `prompt` of
    the node a link comes from."""
    seen = {node}
    while isinstance(api[node]["inputs"].get(name), list):
        source = api[node]["inputs"][name][0]
        if source not in api or source in seen:
            break
        node, name = source, "prompt"
        seen.add(node)
    return node, name


def apply_overrides(
    api: dict, prompt: str | None = None, negative: str | None = None, seed: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """--prompt / --negative go to the Kandinsky 5 Text Encode node(s) (a prompt fed by a link, as Prompt Expansion
    feeds it in the bundled workflows, to the prompt of the node it comes from), --seed to the sampler(s), then
    --set."""
    for value, name, cls in (
        (prompt, "prompt", "K5TextEncode"),
        (negative, "negative_prompt", "K5TextEncode"),
        (seed, "seed", "K5Sampler"),
    ):
        if value is None:
            continue
        ids = [i for i, n in api.items() if n["class_type"] == cls]
        if not ids:
            raise InputError(f"--{name.split('_')[0]} needs a {cls} node; this workflow has none. Use --set instead.")
        for i in ids:
            set_input(api, *_text_holder(api, i, name), value, parse=False)
    for item in sets:
        set_input(api, *parse_set(item))
    return api


def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"workflow {path} does not exist. Pass a .json workflow (UI or API format).") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"workflow {path} is not valid JSON ({e}). Pass a workflow saved by ComfyUI.") from None
    if not isinstance(data, dict) or not (is_api_workflow(data) or isinstance(data.get("nodes"), list)):
        raise InputError(
            f"workflow {path} is neither a UI-format workflow (with 'nodes' and 'links') nor an API-format one "
            "({id: {class_type, inputs}}). Save it from ComfyUI with Save or Export (API)."
        )
    return data
