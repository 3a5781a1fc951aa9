"""Kandinsky 5.0 inference engine: variants, DiT, NABLA attention, sampling, encoders, VAEs, loading.

Knows nothing of ComfyUI; `nodes/` adapts it. Importing this package loads no model and touches no GPU.
"""

__version__ = "0.1.0"
