"""torch.compile for the DiT, as an option: the repeated transformer blocks are compiled one by one (regional
compilation: identical blocks share one compiled graph) and any compiler failure falls back to eager.

Nothing is compiled here at import or when `compile_dit` is called: torch.compile is lazy, the work happens on the
first forward. If that (or any later compiled call) raises from the compiler (no C++ toolchain, no Triton, an
unsupported op, ...), one warning is logged and the DiT runs eagerly from then on. A block's forward has no side
effects, so re-running the failed call eagerly gives exactly the eager result.

Only `forward` is compiled, not the module's `__call__`, so the forward pre-hooks of block swap (`offload.py`) still
run eagerly around each compiled block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import InputError, KandinskyError

log = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_STATE = "_k5_compile"  # attribute of a compiled DiT: its CompileState


@dataclass
class CompileState:
    """Shared by all compiled blocks of one DiT: once the compiler fails, every block runs eagerly."""

    mode: str | None
    backend: str | Callable
    failed: bool = False
    error: str | None = None
    compiled_calls: int = 0
    eager_calls: int = 0


class _Guarded:
    """A block's forward: the compiled one until the compiler fails once, the eager one after that."""

    def __init__(self, eager: Callable, compiled: Callable, state: CompileState):
        self.eager = eager
        self.compiled = compiled
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.failed:
            state.eager_calls += 1
            return self.eager(*args, **kwargs)
        try:
            # Past torch._dynamo's recompile limit (8 shapes per block with dynamic=False) dynamo would run the
            # block eagerly without a word while we count compiled calls: make it raise, so the fallback is told.
            with _recompile_limit_raises():
                out = self.compiled(*args, **kwargs)
        except KandinskyError:
            raise  # our own input errors are not compiler failures
        except Exception as e:  # the compiler's failures have no common base class
            state.failed = True
            state.error = describe_compile_error(e)
            log.warning(
                "torch.compile failed (backend %s, mode %s), running the DiT without compiling: %s",
                getattr(state.backend, "__name__", state.backend), state.mode, state.error[:300],
            )  # fmt: skip
            state.eager_calls += 1
            return self.eager(*args, **kwargs)
        state.compiled_calls += 1
        return out


def _recompile_limit_raises():
    import torch._dynamo

    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def describe_compile_error(error: BaseException) -> str:
    """The root cause of a compiler error in one line (dynamo wraps a backend's own error in BackendCompilerFailed)."""
    while getattr(error, "inner_exception", None) is not None or error.__cause__ is not None:
        error = getattr(error, "inner_exception", None) or error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _blocks(dit: nn.Module) -> list[nn.Module]:
    return [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]


def compile_dit(
    dit: nn.Module, mode: str | None = None, backend: str | Callable = "inductor", dynamic: bool = False
) -> nn.Module:
    """Compile each text and visual block's forward of a Kandinsky5DiT in place (lazily, on first use); returns
    `dit`. `mode` / `backend` / `dynamic` are torch.compile's (backend "eager" or "aot_eager" checks the tracing
    without generating code). Calling it again on a compiled DiT recompiles with the new settings."""
    import torch

    if mode not in MODES:
        raise InputError(f"compile mode {mode!r} is not allowed. Allowed: {', '.join(str(m) for m in MODES)}.")
    if not hasattr(dit, "visual_transformer_blocks"):
        raise InputError(f"compile_dit needs a Kandinsky5DiT; got {type(dit).__name__}.")
    uncompile_dit(dit)
    state = CompileState(mode=mode, backend=backend)
    for block in _blocks(dit):
        eager = block.forward  # the class's forward, bound to this block
        compiled = torch.compile(eager, mode=mode, backend=backend, dynamic=dynamic)
        block.forward = _Guarded(eager, compiled, state)  # instance attribute shadows the class method
    setattr(dit, _STATE, state)
    return dit


def uncompile_dit(dit: nn.Module) -> nn.Module:
    """Undo compile_dit: every block runs its eager forward again (a no-op for a DiT that is not compiled)."""
    for block in _blocks(dit):
        if isinstance(block.__dict__.get("forward"), _Guarded):
            del block.forward
    if _STATE in dit.__dict__:
        delattr(dit, _STATE)
    return dit


def compile_state(dit: nn.Module) -> CompileState | None:
    """The CompileState of a compiled DiT (whether the compiler failed, calls made each way), None if not compiled."""
    return getattr(dit, _STATE, None)
