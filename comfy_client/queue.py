"""`python -m kandinsky_core queue`: run a ComfyUI workflow on a running ComfyUI server, headless.

A UI-format workflow is converted to the API format against the server's /object_info (workflow.py), queued over
HTTP, followed over the WebSocket with a progress bar (server.py), and its outputs are downloaded.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from kandinsky_core.errors import InputError, OutputError

from .server import DEFAULT_SERVER, Client, ServerError, WebSocket
from .workflow import apply_overrides, is_api_workflow, load_workflow, ui_to_api

__all__ = ["DEFAULT_SERVER", "ServerError", "apply_overrides", "run_workflow"]

POLL_S = 5.0  # /history is checked when the WebSocket has been quiet this long
RECONNECT_S = 10.0  # how long to wait for a dropped server to answer again


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
    from kandinsky_core.media import ensure_writable_folder

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
