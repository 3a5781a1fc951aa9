"""`python -m kandinsky_core queue`: run a ComfyUI workflow on a running ComfyUI server, headless.

Standard library only (urllib and a small WebSocket reader), so it works from any Python without the pack's
dependencies. A UI-format workflow (what ComfyUI's Save / drag-and-drop use) is converted to the API format
(what POST /prompt takes) against the server's /object_info, the same conversion scripts/make_workflows.py uses
for the bundled API twins.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, KandinskyError, OutputError

DEFAULT_SERVER = "http://127.0.0.1:8188"
FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")  # never sent to the server
MUTED, BYPASSED = 2, 4  # UI node modes
POLL_S = 5.0  # /history is checked when the WebSocket has been quiet this long
RECONNECT_S = 10.0  # how long to wait for a dropped server to answer again
EXPORT_HINT = "In ComfyUI, save the workflow with Export (API) and queue that file instead."
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class ServerError(KandinskyError):
    """ComfyUI cannot be reached, refused the workflow, failed while running it, or went away mid-run."""


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


def apply_overrides(
    api: dict, prompt: str | None = None, negative: str | None = None, seed: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """--prompt / --negative go to the Kandinsky 5 Text Encode node(s), --seed to the sampler(s), then --set."""
    for value, name, cls in (
        (prompt, "prompt", "K5TextEncode"),
        (negative, "negative_prompt", "K5TextEncode"),
        (seed, "seed", "K5Sampler"),
    ):
        if value is None:
            continue
        if not [i for i, n in api.items() if n["class_type"] == cls]:
            raise InputError(f"--{name.split('_')[0]} needs a {cls} node; this workflow has none. Use --set instead.")
        set_input(api, cls, name, value, parse=False)
    for item in sets:
        set_input(api, *parse_set(item))
    return api


# ---------------------------------------------------------------- HTTP


def _describe_os_error(e: BaseException) -> str:
    reason = getattr(e, "reason", e)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    return f"{type(reason).__name__}: {reason}"


@dataclass
class Client:
    server: str = DEFAULT_SERVER
    timeout: float = 30.0
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.server = self.server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        parts = urllib.parse.urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--server {self.server!r} is not an http(s) URL. Use e.g. --server {DEFAULT_SERVER}.")
        # a local server is never reached through an HTTP proxy from the environment
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        self.opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    def unreachable(self, e: BaseException) -> ServerError:
        return ServerError(
            f"Cannot reach ComfyUI at {self.server} ({_describe_os_error(e)}). Start ComfyUI (python main.py "
            f"--listen 127.0.0.1 --port 8188) or pass the right address with --server."
        )

    def request(self, path: str, data: dict | None = None, timeout: float | None = None) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.server + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(req, timeout=timeout or self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise self.unreachable(e) from None

    def get_json(self, path: str) -> dict:
        status, raw = self.request(path)
        if status != 200:
            raise ServerError(
                f"ComfyUI at {self.server} answered {status} to GET {path}: {raw[:500].decode(errors='replace')}"
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{self.server}{path} did not answer JSON: is --server a ComfyUI server?") from None

    def post_prompt(self, api: dict) -> str:
        status, raw = self.request("/prompt", {"prompt": api, "client_id": self.client_id})
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = {"error": {"message": raw[:1000].decode(errors="replace")}}
        if status != 200 or "prompt_id" not in body:
            raise ServerError(f"ComfyUI refused the workflow ({status}):\n{format_refusal(body, api)}")
        return body["prompt_id"]


def format_refusal(body: dict, api: dict) -> str:
    """The server's 400 answer ("error" + per-node "node_errors") as readable lines."""
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"  {err.get('message', '')}{': ' + err['details'] if err.get('details') else ''}")
    elif err:
        lines.append(f"  {err}")
    for node_id, info in (body.get("node_errors") or {}).items():
        cls = info.get("class_type") or api.get(node_id, {}).get("class_type", "?")
        for e in info.get("errors", []):
            detail = f" ({e['details']})" if e.get("details") else ""
            lines.append(f"  node {node_id} ({cls}): {e.get('message', '')}{detail}")
    lines = list(dict.fromkeys(lines))  # ComfyUI repeats a node's custom validation message once per input
    return "\n".join(lines) or f"  {json.dumps(body)[:1000]}"


# ---------------------------------------------------------------- WebSocket (read side of RFC 6455)


class WebSocket:
    """Reads ComfyUI's /ws messages. Client frames (only the close/pong replies) are masked as RFC 6455 requires."""

    def __init__(self, client: Client, timeout: float):
        parts = urllib.parse.urlsplit(client.server)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            sock = socket.create_connection((parts.hostname, port), timeout=timeout)
            if parts.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        except OSError as e:
            raise client.unreachable(e) from None
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path.rstrip("/") or "") + f"/ws?clientId={client.client_id}"
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = self._recv(1)
            except TimeoutError:
                chunk = b""
            if not chunk:
                self.close()
                raise ServerError(
                    f"ComfyUI at {client.server} did not complete the WebSocket handshake on /ws: is it a ComfyUI "
                    "server? Check --server."
                )
            head += chunk
        self.buffer = head.split(b"\r\n\r\n", 1)[1]
        if b" 101 " not in head.split(b"\r\n")[0] + b" ":
            raise ServerError(
                f"{client.server}/ws refused the WebSocket: {head.splitlines()[0].decode(errors='replace')}"
            )

    def _recv(self, n: int) -> bytes:
        try:
            return self.sock.recv(n)
        except TimeoutError:
            raise
        except OSError:
            return b""

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self._recv(65536)
            if not chunk:
                raise ConnectionError("the WebSocket was closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames only: payload < 126
        try:
            self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        except OSError:
            pass

    def receive(self, timeout: float) -> dict | bytes | None:
        """The next message (dict for text, bytes for binary); None when nothing came within `timeout`.
        ConnectionError when the server closed the connection."""
        self.sock.settimeout(max(timeout, 0.01))
        try:
            b0, b1 = self._exact(2)
        except TimeoutError:
            return None
        self.sock.settimeout(30)
        opcode, length = b0 & 0x0F, b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._exact(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._exact(8))
        mask = self._exact(4) if b1 & 0x80 else b""
        payload = self._exact(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if opcode == 8:
            raise ConnectionError("the server closed the WebSocket")
        if opcode == 9:
            self._send(10, payload)
            return self.receive(timeout)
        if opcode == 1:
            try:
                return json.loads(payload)
            except ValueError:
                return {}
        return payload if opcode == 2 else {}

    def close(self) -> None:
        self._send(8)
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- running a workflow


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


def to_api(workflow: dict, client: Client) -> dict:
    if is_api_workflow(workflow):
        return json.loads(json.dumps(workflow))
    return ui_to_api(workflow, client.get_json("/object_info"))


class ProgressBar:
    def __init__(self, api: dict, stream=None, width: int = 30):
        self.api, self.stream, self.width = api, stream or sys.stderr, width
        self.open = False

    def node(self, node_id: str) -> str:
        n = self.api.get(str(node_id), {})
        return f"{node_id} {n.get('_meta', {}).get('title') or n.get('class_type', '')}".strip()

    def update(self, node_id: str, value: int, total: int) -> None:
        done = int(self.width * value / max(total, 1))
        bar = "#" * done + "-" * (self.width - done)
        self.stream.write(f"\r[{bar}] {value}/{total} {self.node(node_id)}")
        self.stream.flush()
        self.open = True

    def end(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False


def _execution_error(data: dict, bar: ProgressBar) -> ServerError:
    node = data.get("node_id")
    where = f"node {bar.node(node)}" if node is not None else "the workflow"
    kind = data.get("exception_type", "")
    return ServerError(
        f"ComfyUI failed while running {where} ({data.get('node_type', '?')}): "
        f"{kind + ': ' if kind else ''}{str(data.get('exception_message', '')).strip()}"
    )


def _history_entry(client: Client, prompt_id: str) -> dict | None:
    """The finished prompt's /history entry (ComfyUI writes it when the run ends), or None while it runs."""
    return client.get_json(f"/history/{prompt_id}").get(prompt_id) or None


def _after_disconnect(client: Client, prompt_id: str) -> dict | None:
    """The WebSocket dropped. Returns the history entry when the run had finished, None when the prompt is still
    queued (then follow again); ServerError when the server restarted (the prompt is gone) or does not answer."""
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            entry = _history_entry(client, prompt_id)
            if entry is not None:
                return entry
            queue = client.get_json("/queue")
        except ServerError:
            if time.monotonic() > deadline:
                raise ServerError(
                    f"The connection to ComfyUI at {client.server} was lost during the run (the server stopped or "
                    "crashed) and it does not answer now. Check the ComfyUI console, restart it, and queue again."
                ) from None
            time.sleep(0.3)
            continue
        queued = [q[1] for q in queue.get("queue_running", []) + queue.get("queue_pending", []) if len(q) > 1]
        if prompt_id in queued:
            return None
        raise ServerError(
            f"ComfyUI at {client.server} restarted during the run: prompt {prompt_id} is no longer queued and left "
            "no result. Queue the workflow again."
        )


def follow(client: Client, ws: WebSocket, prompt_id: str, timeout: float, bar: ProgressBar) -> dict:
    """Wait for the prompt over the WebSocket; returns its /history entry. ServerError on failure or timeout."""
    deadline = time.monotonic() + timeout
    next_poll = time.monotonic() + POLL_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(
                    f"prompt {prompt_id} did not finish within --timeout {timeout:g} s; it may still be running on "
                    f"{client.server}. Wait for it there, or queue again with a larger --timeout."
                )
            if time.monotonic() > next_poll:  # a run that ended while the WebSocket was away sends nothing more
                entry = _history_entry(client, prompt_id)
                if entry is not None:
                    return entry
                next_poll = time.monotonic() + POLL_S
            try:
                msg = ws.receive(min(left, 1.0))
            except ConnectionError:
                ws.close()
                entry = _after_disconnect(client, prompt_id)
                if entry is not None:
                    return entry
                ws = WebSocket(client, client.timeout)
                continue
            if not isinstance(msg, dict):
                continue
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress":
                bar.update(data.get("node", "?"), int(data.get("value", 0)), int(data.get("max", 1)))
            elif kind == "execution_error":
                raise _execution_error(data, bar)
            elif kind == "execution_interrupted":
                raise ServerError(f"prompt {prompt_id} was interrupted on {client.server} (Cancel or /interrupt).")
            elif kind == "execution_success" or (
                kind == "executing" and data.get("node") is None and "prompt_id" in data
            ):
                for _ in range(50):  # the history entry is written right after the last message
                    entry = _history_entry(client, prompt_id)
                    if entry is not None:
                        return entry
                    time.sleep(0.1)
                raise ServerError(f"prompt {prompt_id} finished but {client.server}/history has no entry for it.")
    finally:
        bar.end()
        ws.close()


def output_files(entry: dict, types: tuple[str, ...] = ("output",)) -> list[dict]:
    """Files the outputs of a history entry name ({"filename", "subfolder", "type"}), in node order."""
    files = []
    for node_id in sorted(entry.get("outputs", {}), key=lambda k: (len(k), k)):
        for values in entry["outputs"][node_id].values():
            if isinstance(values, list):
                files += [v for v in values if isinstance(v, dict) and "filename" in v and v.get("type") in types]
    return files


def download(client: Client, files: list[dict], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for f in files:
        query = urllib.parse.urlencode(
            {"filename": f["filename"], "subfolder": f.get("subfolder", ""), "type": f["type"]}
        )
        status, data = client.request(f"/view?{query}", timeout=max(client.timeout, 120))
        if status != 200:
            raise ServerError(f"downloading {f['filename']} from {client.server}/view failed ({status}).")
        target = output_dir / Path(f["filename"]).name
        stem, n = target.stem, 1
        while target.exists():
            target, n = output_dir / f"{stem}_{n}{target.suffix}", n + 1
        target.write_bytes(data)
        saved.append(target)
    return saved


def run_workflow(
    path: Path, server: str = DEFAULT_SERVER, prompt: str | None = None, negative: str | None = None,
    seed: int | None = None, sets: list[str] | tuple[str, ...] = (), output_dir: Path = Path("."),
    timeout: float = 3600.0, log: Callable[[str], None] = print, progress_stream=None,
) -> list[Path]:  # fmt: skip
    """Queue a workflow file on a ComfyUI server, follow it, download its outputs; returns the files written."""
    if timeout <= 0:
        raise InputError(f"--timeout {timeout:g}: give a positive number of seconds.")
    from .media import ensure_writable_folder

    ensure_writable_folder(output_dir, "--output-dir", "Choose a folder you can write to with --output-dir.")
    workflow = load_workflow(path)
    client = Client(server, timeout=min(30.0, timeout))
    api = apply_overrides(to_api(workflow, client), prompt, negative, seed, sets)
    ws = WebSocket(client, client.timeout)  # before queueing, so that no progress message is missed
    try:
        prompt_id = client.post_prompt(api)
    except BaseException:
        ws.close()
        raise
    log(f"queued {path} as prompt {prompt_id} on {client.server}")
    entry = follow(client, ws, prompt_id, timeout, ProgressBar(api, progress_stream))
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                raise _execution_error(data, ProgressBar(api))
        raise ServerError(f"prompt {prompt_id} failed on {client.server}: {json.dumps(status)[:1000]}")
    files = output_files(entry)
    if not files:
        log(f"prompt {prompt_id} finished; it saved no output files.")
        return []
    try:
        saved = download(client, files, Path(output_dir))
    except OSError as e:
        names = ", ".join(f"{f.get('subfolder') + '/' if f.get('subfolder') else ''}{f['filename']}" for f in files)
        raise OutputError(
            f"The outputs could not be saved in {str(output_dir)!r} ({e.strerror or e}). They are kept on the server, "
            f"in ComfyUI's output folder: {names} (also at {client.server}/view?filename=...). Free the folder and "
            "download them from there."
        ) from e
    for p in saved:
        log(f"saved {p}")
    return saved
