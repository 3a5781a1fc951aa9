"""A small client for a running ComfyUI server, outside the engine (kandinsky_core knows nothing of ComfyUI).

- workflow.py: UI-format -> API-format conversion against /object_info, and `--set`-style overrides.
- server.py: HTTP (urllib) and the /ws message stream (the `websocket-client` library), with clear errors.
- queue.py: `python -m kandinsky_core queue` (queue, follow with a progress bar, download the outputs).

The integration tests read ComfyUI's /ws through server.WebSocket too (tests/integration/comfy_ws.py).
"""
