"""Block swap: the DiT's visual blocks stay on the host and visit the accelerator one at a time.

The visual blocks hold nearly all of a DiT's weights (Lite: 32 of them, ~3.8 GB in bf16; Pro: 60, ~36 GB). With
`enable_block_swap(dit, device, blocks_on_device=N)` the first N stay resident on `device`; every other block keeps
a host copy of its weights, gets a device copy just before it runs and drops it right after. Weights are frozen
during inference, so "moving a block back" only re-points its parameters at the host copy: nothing is copied back.
The numbers a block computes are the same as without swapping (the same weights, only a different home).

On CUDA the host copies are pinned, copies are non-blocking, and the next swapped block is copied on a side stream
while the current one computes (one-block prefetch), so at most N + 2 blocks are on the device at any moment
(N + 1 without a side stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BlockSwap", "enable_block_swap", "swap_layers", "block_bytes"]


def _slots_of(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) of the tensors a module holds directly."""
    return [(module, name, True) for name, p in module._parameters.items() if p is not None] + [
        (module, name, False) for name, b in module._buffers.items() if b is not None
    ]


def _slots(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner module, name, is_parameter) of every tensor a block holds."""
    return [slot for module in block.modules() for slot in _slots_of(module)]


def _get(slot: tuple[nn.Module, str, bool]) -> Tensor:
    module, name, is_param = slot
    return module._parameters[name] if is_param else module._buffers[name]


def _set(slot: tuple[nn.Module, str, bool], value: Tensor) -> None:
    module, name, is_param = slot
    if is_param:
        module._parameters[name].data = value  # keeps the Parameter object (and whoever holds a reference to it)
    else:
        module._buffers[name] = value


def block_bytes(block: nn.Module) -> int:
    return sum(_get(s).numel() * _get(s).element_size() for s in _slots(block))


@dataclass
class BlockSwap:
    """The hooks and host copies of one DiT's swapped visual blocks; `remove()` ends swapping.

    `loads` counts block copies to the device (a run of S steps with CFG and B swapped blocks makes 2*S*B).
    """

    layers: nn.ModuleList
    device: torch.device
    offload_device: torch.device
    blocks_on_device: int
    prefetch: bool
    host: dict[int, list[Tensor]] = field(default_factory=dict)  # block index -> host copies, in _slots order
    loads: int = 0
    _slots: dict[int, list] = field(default_factory=dict)
    _pending: dict[int, tuple[list[Tensor], Any]] = field(default_factory=dict)
    _resident: set[int] = field(default_factory=set)
    _handles: list[Any] = field(default_factory=list)
    _stream: Any = None
    _releases: list[Any] = field(default_factory=list)  # unpin the host buffers

    @property
    def swapped(self) -> list[int]:
        return sorted(self.host)

    def _copy(self, index: int) -> list[Tensor]:
        # copy=True: a separate device copy even when device == offload device (CPU runs, tests)
        return [h.to(self.device, non_blocking=True, copy=True) for h in self.host[index]]

    def _prefetch(self, index: int) -> None:
        if index in self._pending or index in self._resident:
            return
        with torch.cuda.stream(self._stream):
            copies = self._copy(index)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[index] = (copies, event)

    def _load(self, index: int) -> None:
        if index in self._resident:
            return
        if index in self._pending:
            copies, event = self._pending.pop(index)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for c in copies:
                c.record_stream(compute)  # allocated on the side stream, used (and freed) on the compute stream
        else:
            copies = self._copy(index)
        for slot, copy in zip(self._slots[index], copies, strict=True):
            _set(slot, copy)
        self._resident.add(index)
        self.loads += 1

    def _unload(self, index: int) -> None:
        for slot, host in zip(self._slots[index], self.host[index], strict=True):
            _set(slot, host)
        self._resident.discard(index)

    def _before(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._load(index)
            if self._stream is not None:
                later = [i for i in self.swapped if i > index]
                if later:
                    self._prefetch(later[0])

        return hook

    def _after(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._unload(index)

        return hook

    def resident_blocks(self) -> list[int]:
        """Indices of the swapped blocks whose weights are on the device right now (loaded or being prefetched)."""
        return sorted(self._resident | set(self._pending))

    def remove(self) -> None:
        """Stops swapping: hooks removed, swapped blocks left on the offload device, pending copies dropped."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for index in list(self._resident):
            self._unload(index)
        self._pending.clear()
        for release in self._releases:
            release()
        self._releases.clear()


def enable_block_swap(
    dit: nn.Module,
    device: torch.device | str,
    blocks_on_device: int = 0,
    offload_device: torch.device | str = "cpu",
    prefetch: bool = True,
) -> BlockSwap:
    """Put `dit` on `device` except its visual blocks from index `blocks_on_device` on, which run by swapping.

    `prefetch` copies the next block on a CUDA side stream while the current one computes (CUDA only; elsewhere the
    copy happens just before the block runs). Call `.remove()` on the result to stop swapping.
    """
    return swap_layers(dit, dit.visual_transformer_blocks, device, blocks_on_device, offload_device, prefetch)


def swap_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    device: torch.device | str,
    resident: int = 0,
    offload_device: torch.device | str = "cpu",
    prefetch: bool = True,
) -> BlockSwap:
    """Block swap for any model whose bulk is a list of layers run in order (the DiT's visual blocks, Qwen's
    decoder layers): every tensor of `model` outside `layers[resident:]` goes to `device`, those layers swap."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    if isinstance(resident, bool) or not isinstance(resident, int) or resident < 0:
        from .errors import InputError

        raise InputError(
            f"blocks_on_device={resident!r} is not allowed: use a whole number from 0 to {len(layers)} "
            "(blocks kept on the accelerator; the rest are swapped in one at a time)."
        )
    swapped_tensors = {id(_get(slot)) for layer in layers[resident:] for slot in _slots(layer)}
    for module in model.modules():
        for slot in _slots_of(module):
            if id(_get(slot)) not in swapped_tensors:
                _set(slot, _get(slot).to(device))
    use_stream = prefetch and device.type == "cuda"
    pin = device.type == "cuda" and offload_device.type == "cpu"
    swap = BlockSwap(
        layers,
        device,
        offload_device,
        resident,
        use_stream,
        _stream=torch.cuda.Stream(device) if use_stream else None,
    )
    for index in range(resident, len(layers)):
        slots = _slots(layers[index])
        if pin:
            host, release = pin_exact([_get(slot).detach() for slot in slots])
            swap._releases.append(release)
        else:
            host = [_get(slot).detach().to(offload_device) for slot in slots]
        swap._slots[index], swap.host[index] = slots, host
        for slot, h in zip(slots, host, strict=True):
            _set(slot, h)
        swap._handles.append(layers[index].register_forward_pre_hook(swap._before(index)))
        swap._handles.append(layers[index].register_forward_hook(swap._after(index)))
    return swap


_ALIGN = 256  # bytes between tensors in a pinned buffer (any dtype's alignment, and CUDA's copy granularity)


def _cudart() -> Any:
    return torch.cuda.cudart()


def pin_exact(tensors: list[Tensor]) -> tuple[list[Tensor], Any]:
    """Host copies of `tensors` in one page-locked buffer of exactly their size, and a function that unpins it.

    Tensor.pin_memory() goes through CUDA's caching host allocator, which rounds every block up to a power of two
    (a 0.47 GB Qwen layer takes 0.5 GB, a 0.14 GB DiT block 0.27 GB) and keeps the pages pinned after they are
    freed. Here the buffer is ordinary memory registered with cudaHostRegister and unregistered on release, after
    which the copies stay valid as pageable memory."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _ALIGN) * _ALIGN
    buffer = torch.empty(max(total, 1), dtype=torch.uint8)
    copies = []
    for t, offset, size in zip(tensors, offsets, sizes, strict=True):
        view = buffer[offset : offset + size].view(t.dtype).view(t.shape)
        view.copy_(t)
        copies.append(view)
    cudart = _cudart()
    ptr = buffer.data_ptr()
    registered = int(cudart.cudaHostRegister(ptr, buffer.numel(), 1)) == 0  # 1: cudaHostRegisterPortable
    if not registered:
        import logging

        logging.getLogger("kandinsky5").warning("block swap: pinning %d MiB failed; copies will not overlap",
                                                 buffer.numel() >> 20)  # fmt: skip

    def release() -> None:
        nonlocal registered
        if registered:
            cudart.cudaHostUnregister(ptr)
            registered = False

    return copies, release
