"""`python -m kandinsky_core queue` (comfy_client/) against a small fake ComfyUI (HTTP + WebSocket, 127.0.0.1):
success with UI and API workflows and overrides, connection refused, timeout, a server restart or crash mid-run,
a 400 with node_errors and an execution_error. Every failure exits 2 with one clear message and no traceback.
(The real ComfyUI runs in tests/integration/test_workflows_e2e.py.)"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from comfy_client import queue, workflow
from kandinsky_core.cli import main

REPO = Path(__file__).resolve().parents[1]


def _ui_path(variant: str) -> Path:
    """The bundled UI workflow of a variant (its file is named for the template browser: "Kandinsky 5 - NN ...")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ui_path(variant)


UI = _ui_path("t2v-lite-sft-5s")
API = REPO / "workflows" / "api" / "t2v-lite-sft-5s.json"
OBJECT_INFO = json.loads((REPO / "tests" / "data" / "object_info.json").read_text())
PROMPT_ID = "p-123"
WEBP = b"RIFF\x00\x00\x00\x00WEBPfake"


def ws_frame(message: dict | bytes) -> bytes:
    payload, opcode = (json.dumps(message).encode(), 1) if isinstance(message, dict) else (message, 2)
    n = len(payload)
    head = bytes([0x80 | opcode, n]) if n < 126 else bytes([0x80 | opcode, 126]) + struct.pack(">H", n)
    return head + payload


class LoopbackServer(ThreadingHTTPServer):
    def server_bind(self):  # HTTPServer.server_bind looks up the host's FQDN, which can take seconds offline
        socket.socket.bind(self.socket, self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


class FakeComfy:
    """Scenario knobs: `refuse` (a 400 body), `events` (WebSocket messages sent once the prompt is queued; "close"
    closes the socket, ("sleep", s) waits), `history` (what /history answers after the run)."""

    def __init__(self):
        self.refuse: dict | None = None
        self.events: list = []
        self.history: dict = {}
        self.queue_running: list = []
        self.no_websocket = False  # answer /ws with a 404, as an HTTP server that is not ComfyUI does
        self.posted: list[dict] = []
        self.queued = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, status: int, body: dict | bytes, kind: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/ws":
                    return self.reply(404, b"not found", "text/plain") if fake.no_websocket else self.websocket()
                if url.path == "/object_info":
                    return self.reply(200, OBJECT_INFO)
                if url.path.startswith("/history/"):
                    return self.reply(200, fake.history)
                if url.path == "/queue":
                    return self.reply(200, {"queue_running": fake.queue_running, "queue_pending": []})
                if url.path == "/view":
                    q = urllib.parse.parse_qs(url.query)
                    ok = q == {"filename": ["k5_00001_.webp"], "subfolder": ["kandinsky5"], "type": ["output"]}
                    return self.reply(200 if ok else 404, WEBP if ok else b"no such file", "image/webp")
                self.reply(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.posted.append(body)
                if fake.refuse is not None:
                    return self.reply(400, fake.refuse)
                self.reply(200, {"prompt_id": PROMPT_ID, "number": 0, "node_errors": {}})
                fake.queued.set()

            def websocket(self):
                key = self.headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                accept = base64.b64encode(hashlib.sha1(key).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.write(ws_frame({"type": "status", "data": {"status": {}, "sid": "x"}}))
                self.wfile.flush()
                if not fake.queued.wait(10):
                    return
                events, fake.events = fake.events, []  # a reconnecting client gets no replay
                for event in events:
                    if event == "close":
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if isinstance(event, tuple):
                        time.sleep(event[1])
                        continue
                    self.wfile.write(ws_frame(event))
                    self.wfile.flush()
                time.sleep(5)  # hold the socket open, as a server between messages does

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeComfy()
    yield server
    server.stop()


def progress(value: int, total: int, node: str = "6") -> dict:
    return {"type": "progress", "data": {"value": value, "max": total, "node": node, "prompt_id": PROMPT_ID}}


def success_history() -> dict:
    image = {"filename": "k5_00001_.webp", "subfolder": "kandinsky5", "type": "output"}
    preview = {"filename": "preview.png", "subfolder": "", "type": "temp"}
    return {
        PROMPT_ID: {
            "outputs": {"10": {"images": [image], "animated": [True]}, "11": {"images": [preview]}},
            "status": {"status_str": "success", "completed": True, "messages": []},
        }
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["queue", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_ui_workflow_runs_with_overrides_and_downloads_outputs(fake, tmp_path, capsys):
    fake.events = [
        {"type": "execution_start", "data": {"prompt_id": PROMPT_ID}},
        progress(1, 2),
        {"type": "progress", "data": {"value": 9, "max": 9, "node": "6", "prompt_id": "someone-else"}},
        progress(2, 2),
        {"type": "executing", "data": {"node": None, "prompt_id": PROMPT_ID}},
    ]
    fake.history = success_history()
    args = ["--server", fake.url, "--prompt", "a cat", "--negative", "dogs", "--seed", "7", "--output-dir"]
    args += [str(tmp_path / "out"), "--set", "K5Sampler.steps=3", "--set", "2.dit_name=tiny.safetensors"]
    code, out, err = run(capsys, str(UI), *args)
    assert code == 0, err
    sent = fake.posted[0]
    assert sent["client_id"] and len(fake.posted) == 1
    graph = sent["prompt"]
    # the bundled workflow's Text Encode takes its prompt from Prompt Expansion: --prompt goes there
    (expansion,) = [i for i, n in graph.items() if n["class_type"] == "K5PromptExpansion"]
    assert graph["5"]["inputs"]["prompt"] == [expansion, 0] and graph[expansion]["inputs"]["prompt"] == "a cat"
    assert graph["5"]["inputs"]["negative_prompt"] == "dogs"
    assert graph["6"]["inputs"]["seed"] == 7 and graph["6"]["inputs"]["steps"] == 3
    assert graph["2"]["inputs"]["dit_name"] == "tiny.safetensors"
    assert "1" not in graph  # the Note node is frontend-only
    assert (tmp_path / "out" / "k5_00001_.webp").read_bytes() == WEBP
    assert not (tmp_path / "out" / "preview.png").exists()  # temp previews are not outputs
    assert "2/2" in err and "Kandinsky 5 Sampler" in err
    assert "saved" in out and "k5_00001_.webp" in out


def test_api_workflow_is_sent_as_is_apart_from_overrides(fake, tmp_path, capsys):
    fake.events = [progress(1, 1), {"type": "execution_success", "data": {"prompt_id": PROMPT_ID}}]
    fake.history = success_history()
    code, _, err = run(capsys, str(API), "--server", fake.url, "--output-dir", str(tmp_path), "--set", "6.width=256")
    assert code == 0, err
    expected = json.loads(API.read_text())
    expected["6"]["inputs"]["width"] = 256
    assert fake.posted[0]["prompt"] == expected


def test_connection_refused(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, _, err = run(capsys, str(API), "--server", f"http://127.0.0.1:{port}")
    assert code == 2
    assert f"Cannot reach ComfyUI at http://127.0.0.1:{port} (connection refused)" in err
    assert "--server" in err


def test_server_without_websocket(fake, capsys):
    fake.no_websocket = True
    code, _, err = run(capsys, str(API), "--server", fake.url)
    assert code == 2 and f"{fake.url}/ws refused the WebSocket: HTTP 404" in err
    assert not fake.posted  # nothing is queued that could not be followed


def test_timeout(fake, capsys):
    fake.events = [progress(1, 50)]
    start = time.monotonic()
    code, _, err = run(capsys, str(API), "--server", fake.url, "--timeout", "1.5")
    assert code == 2 and time.monotonic() - start < 10
    assert f"prompt {PROMPT_ID} did not finish within --timeout 1.5 s" in err


def test_server_restart_mid_run(fake, capsys):
    fake.events = [progress(1, 50), "close"]  # the restarted server knows neither the prompt nor its history
    code, _, err = run(capsys, str(API), "--server", fake.url)
    assert code == 2
    assert f"restarted during the run: prompt {PROMPT_ID} is no longer queued" in err
    assert "Queue the workflow again" in err


def test_server_gone_mid_run(fake, capsys, monkeypatch):
    monkeypatch.setattr(queue, "RECONNECT_S", 1.0)
    fake.events = [progress(1, 50), ("sleep", 0.2), "close"]
    threading.Timer(0.1, fake.stop).start()  # stops answering HTTP before the WebSocket drops
    code, _, err = run(capsys, str(API), "--server", fake.url)
    assert code == 2
    assert "connection to ComfyUI" in err and "was lost during the run" in err and "does not answer now" in err


def test_dropped_websocket_while_still_queued_reconnects_and_finishes(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(queue, "POLL_S", 0.5)
    fake.queue_running = [[0, PROMPT_ID, {}, {}, []]]
    fake.events = [progress(1, 2), "close"]
    fake.history = {}

    def finish():  # the run ends while the client is reconnecting
        time.sleep(1.0)
        fake.history = success_history()  # ComfyUI records the history, then frees the queue slot
        fake.queue_running = []

    threading.Thread(target=finish, daemon=True).start()
    code, _, err = run(capsys, str(API), "--server", fake.url, "--output-dir", str(tmp_path), "--timeout", "20")
    assert code == 0, err
    assert (tmp_path / "k5_00001_.webp").is_file()


def test_node_errors_are_printed(fake, capsys):
    # the body ComfyUI 0.3.x answers for a combo value that is not in the list
    fake.refuse = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                          "details": "dit_name: 'nope.safetensors' not in []",
                                          "extra_info": {}}] * 2,
                              "dependent_outputs": ["10"], "class_type": "K5LoadDiT"}},
    }  # fmt: skip
    code, _, err = run(capsys, str(API), "--server", fake.url, "--set", "2.dit_name=nope.safetensors")
    assert code == 2
    assert "ComfyUI refused the workflow (400)" in err and "Prompt outputs failed validation" in err
    line = "node 2 (K5LoadDiT): Value not in list (dit_name: 'nope.safetensors' not in [])"
    assert err.count(line) == 1  # said twice by the server (as custom validation does per input), printed once


def test_execution_error_is_printed(fake, capsys):
    fake.events = [
        progress(1, 2),
        {"type": "execution_error", "data": {
            "prompt_id": PROMPT_ID, "node_id": "6", "node_type": "K5Sampler", "exception_type": "InputError",
            "exception_message": "Kandinsky 5 Sampler: start_latent is missing", "traceback": ["..."],
        }},
    ]  # fmt: skip
    code, _, err = run(capsys, str(API), "--server", fake.url)
    assert code == 2
    assert "ComfyUI failed while running node 6 Kandinsky 5 Sampler (K5Sampler)" in err
    assert "InputError: Kandinsky 5 Sampler: start_latent is missing" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "steps=3"], "expected NODE.INPUT=VALUE"),
        (["--set", "NoSuchNode.steps=3"], "no node has id, title or type 'NoSuchNode'"),
        (["--set", "6.model=3"], "is connected to another node"),
        (["--set", "K5Sampler.stpes=3"], "node 6 (K5Sampler) has no input 'stpes'. Its inputs: width"),
        (["--timeout", "0"], "--timeout 0"),
        (["--server", "ftp://x"], "is not an http(s) URL"),
    ],
)
def test_bad_arguments(args, message, capsys):
    code, _, err = run(capsys, str(API), *args)
    assert code == 2 and message in err


def test_bad_workflow_files(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code, _, err = run(capsys, str(missing))
    assert code == 2 and f"workflow {missing} does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, str(bad))
    assert code == 2 and "is not valid JSON" in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    code, _, err = run(capsys, str(other))
    assert code == 2 and "neither a UI-format workflow" in err


def test_set_keeps_types():
    api = json.loads(API.read_text())
    workflow.apply_overrides(api, sets=["K5Sampler.guidance=2", "5.template=image", "2.dit_name=123", "6.steps=4"])
    s = api["6"]["inputs"]
    assert s["guidance"] == 2.0 and isinstance(s["guidance"], float)
    assert api["5"]["inputs"]["template"] == "image" and s["steps"] == 4 and api["2"]["inputs"]["dit_name"] == "123"
    workflow.apply_overrides(api, sets=["Kandinsky 5 Sampler.width=128"])  # by title
    assert s["width"] == 128


def test_missing_websocket_client_is_named(monkeypatch, capsys):
    for name in ("comfy_client.queue", "comfy_client.server"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "websocket", None)  # as if websocket-client were not installed
    code, _, err = run(capsys, str(API))
    assert code == 2 and "queue needs the websocket-client package" in err and "requirements.txt" in err
