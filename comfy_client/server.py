"""Talking to a ComfyUI server: JSON over HTTP (urllib) and its /ws message stream (the `websocket-client` library).

Every failure is a ServerError that says what happened and what to do: unreachable, refused, not a ComfyUI server.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

import websocket

from kandinsky_core.errors import InputError, KandinskyError

DEFAULT_SERVER = "http://127.0.0.1:8188"


class ServerError(KandinskyError):
    """ComfyUI cannot be reached, refused the workflow, failed while running it, or went away mid-run."""


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
        self.loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        self.opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if self.loopback else []))

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


class WebSocket:
    """ComfyUI's /ws message stream for this client id: JSON messages (progress, executing, errors) and binary
    previews. Pings are answered by the library."""

    def __init__(self, client: Client, timeout: float):
        parts = urllib.parse.urlsplit(client.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws?clientId={client.client_id}"
        try:
            # as for HTTP, a local server is reached directly whatever proxy the environment names
            direct = [parts.hostname] if client.loopback else None
            self.ws = websocket.create_connection(url, timeout=timeout, enable_multithread=True, http_no_proxy=direct)
        except websocket.WebSocketBadStatusException as e:
            raise ServerError(f"{client.server}/ws refused the WebSocket: HTTP {e.status_code}") from None
        except websocket.WebSocketException:  # the server answered, but not with a WebSocket handshake
            raise ServerError(
                f"ComfyUI at {client.server} did not complete the WebSocket handshake on /ws: is it a ComfyUI "
                "server? Check --server."
            ) from None
        except OSError as e:
            raise client.unreachable(e) from None

    def receive(self, timeout: float) -> dict | bytes | None:
        """The next message (dict for text, bytes for binary); None when nothing came within `timeout`.
        ConnectionError when the server closed the connection."""
        self.ws.settimeout(max(timeout, 0.01))
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError) as e:
            raise ConnectionError(f"the WebSocket was closed ({e})") from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError("the server closed the WebSocket")
        if opcode == websocket.ABNF.OPCODE_TEXT:
            try:
                return json.loads(data)
            except ValueError:
                return {}
        return data if opcode == websocket.ABNF.OPCODE_BINARY else {}

    def close(self) -> None:
        """Says goodbye without waiting for the server's answer; also unblocks a receive() on another thread."""
        try:
            self.ws.send_close()
        except (websocket.WebSocketException, OSError):
            pass
        self.ws.abort()
        self.ws.shutdown()
