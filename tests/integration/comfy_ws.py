"""ComfyUI's /ws (progress events and preview images) recorded on a background thread, read with the pack's own
client (comfy_client.server.WebSocket). Messages are kept with their arrival time."""

from __future__ import annotations

import threading
import time

from comfy_client.server import Client, WebSocket


class ComfyWebSocket:
    def __init__(self, port: int, client_id: str, timeout: float = 10):
        self.ws = WebSocket(Client(f"http://127.0.0.1:{port}", client_id=client_id), timeout)
        self.events: list[tuple[float, str, object]] = []  # (time, "json" | "binary", message)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                message = self.ws.receive(1.0)
            except ConnectionError:
                return
            if message is None:
                continue
            kind = "binary" if isinstance(message, bytes) else "json"
            with self.lock:
                self.events.append((time.monotonic(), kind, message))

    def snapshot(self) -> list[tuple[float, str, object]]:
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        self.closed.set()
        self.ws.close()
        self.thread.join(timeout=5)
