"""A minimal read-only WebSocket client for ComfyUI's /ws (progress events and preview images), standard library only.

It performs the RFC 6455 handshake and reads unmasked server frames on a background thread; it never sends data
frames, so it needs no masking. Messages are kept with their arrival time.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time


class ComfyWebSocket:
    def __init__(self, port: int, client_id: str, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("ComfyUI closed the WebSocket during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")
        self.sock.settimeout(None)
        self.events: list[tuple[float, str, object]] = []  # (time, "json" | "binary", message)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                b0, b1 = self._exact(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    (length,) = struct.unpack(">H", self._exact(2))
                elif length == 127:
                    (length,) = struct.unpack(">Q", self._exact(8))
                payload = self._exact(length)
                if opcode == 8:
                    return
                kind, message = ("json", json.loads(payload)) if opcode == 1 else ("binary", payload)
                with self.lock:
                    self.events.append((time.monotonic(), kind, message))
        except (OSError, ConnectionError, ValueError):
            return

    def snapshot(self) -> list[tuple[float, str, object]]:
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
