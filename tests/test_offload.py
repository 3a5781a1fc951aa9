"""Block swap on the tiny Pro-like DiT (3 visual blocks): identical numbers, and a residency bound observed from
outside (forward hooks that look at which tensor each visual block's parameters point at while blocks run)."""

import contextlib

import pytest
import torch
from tiny import TINY_ARCHS, make_inputs, make_tiny_dit

from kandinsky_core import offload
from kandinsky_core.errors import InputError
from kandinsky_core.magcache import MagCache, MagCacheParams
from kandinsky_core.offload import enable_block_swap
from kandinsky_core.sampling import TextConditioning, sample

ARCH = TINY_ARCHS["pro"]


@pytest.fixture
def dit():
    return make_tiny_dit(ARCH, seed=5)


def forward(dit, seed=0):
    return dit(**make_inputs(ARCH, grid=(2, 4, 6), seed=seed))


class Residency:
    """At the start of every visual block's forward: which blocks have parameters that are not where they were when
    the test started (the host tensors), i.e. hold a copy made for the compute device."""

    def __init__(self, dit):
        self.blocks = dit.visual_transformer_blocks
        self.home = [[p.data_ptr() for p in b.parameters()] for b in self.blocks]
        self.seen: list[tuple[int, list[int]]] = []  # (running block, blocks holding device copies)
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(self.blocks)]

    def away(self) -> list[int]:
        return [
            i
            for i, b in enumerate(self.blocks)
            if any(p.data_ptr() != h for p, h in zip(b.parameters(), self.home[i], strict=True))
        ]

    def _hook(self, index):
        def hook(module, args):
            self.seen.append((index, self.away()))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_swapping_gives_identical_numbers(dit):
    want = [forward(dit, seed) for seed in (0, 1)]
    swap = enable_block_swap(dit, "cpu", blocks_on_device=1)
    got = [forward(dit, seed) for seed in (0, 1)]
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
    assert swap.swapped == [1, 2] and swap.loads == 4  # 2 calls x 2 swapped blocks
    swap.remove()
    assert torch.equal(forward(dit, 0), want[0]) and swap.loads == 4  # hooks gone


def test_one_swapped_block_on_the_device_at_a_time(dit):
    swap = enable_block_swap(dit, "cpu", blocks_on_device=0)
    probe = Residency(dit)  # registered after the swap's own hooks: sees each block as it runs
    try:
        forward(dit)
        forward(dit)
    finally:
        probe.close()
    # every block ran on a fresh device copy of its own weights, and it was the only one away from home
    assert probe.seen == [(i, [i]) for i in (0, 1, 2)] * 2
    assert probe.away() == [] and swap.resident_blocks() == []


def test_the_residency_probe_catches_blocks_left_on_the_device(dit, monkeypatch):
    monkeypatch.setattr(offload.BlockSwap, "_unload", lambda self, index: None)  # a broken swap: never moves back
    enable_block_swap(dit, "cpu")
    probe = Residency(dit)
    forward(dit)
    probe.close()
    assert max(len(away) for _, away in probe.seen) == 3  # all blocks ended up resident: the bound above would fail


def test_resident_blocks_are_never_copied(dit):
    first = [p.data_ptr() for p in dit.visual_transformer_blocks[0].parameters()]
    swap = enable_block_swap(dit, "cpu", blocks_on_device=2)
    probe = Residency(dit)
    forward(dit)
    probe.close()
    assert [p.data_ptr() for p in dit.visual_transformer_blocks[0].parameters()] == first
    assert [away for _, away in probe.seen] == [[], [], [2]] and swap.swapped == [2]


def test_block_swap_composes_with_magcache_in_the_sampler(dit):
    g = torch.Generator().manual_seed(0)
    cond = TextConditioning(torch.randn(1, 3, 3584, generator=g), torch.ones(1, 3, dtype=torch.bool),
                            torch.randn(1, 768, generator=g))  # fmt: skip
    noise = torch.randn(1, 16, 2, 4, 6, generator=g)
    params = MagCacheParams(tuple([1.01, 1.01] * 7), threshold=0.5, K=2, retention=0.0)
    kw = dict(steps=8, guidance=1.0, scheduler_scale=5.0)
    plain_cache = MagCache(params)
    want = sample(dit, noise, cond, None, block_cache=plain_cache, **kw)
    swap = enable_block_swap(dit, "cpu", blocks_on_device=1)
    cache = MagCache(params)
    got = sample(dit, noise, cond, None, block_cache=cache, **kw)
    assert torch.equal(want, got) and cache.skipped == plain_cache.skipped and cache.skipped
    assert swap.loads == 2 * (8 - len(cache.skipped))  # skipped steps never touch the blocks


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_blocks_on_device(dit, bad):
    with pytest.raises(InputError, match=r"blocks_on_device=.* whole number from 0 to 3"):
        enable_block_swap(dit, "cpu", blocks_on_device=bad)


class FakeStreams:
    """torch.cuda's stream API, recorded: lets the prefetch path run (and be checked) on the CPU."""

    def __init__(self):
        self.log: list[str] = []

    @contextlib.contextmanager
    def stream(self, s):
        self.log.append("side stream")
        yield

    def Event(self):  # noqa: N802 - torch.cuda.Event
        fake = self

        class Event:
            def record(self, stream):
                fake.log.append("record")

        return Event()

    def current_stream(self, device=None):
        fake = self

        class Stream:
            def wait_event(self, event):
                fake.log.append("wait")

        return Stream()


def test_prefetch_copies_the_next_block_while_the_current_one_runs(dit, monkeypatch):
    want = forward(dit)
    fake = FakeStreams()
    swap = enable_block_swap(dit, "cpu", blocks_on_device=0, prefetch=True)
    swap._stream = object()  # as enable_block_swap does on CUDA
    for name in ("stream", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None, raising=False)
    probe = Residency(dit)
    got = forward(dit)
    probe.close()
    assert torch.equal(got, want)
    # block 0 is copied on demand; 1 and 2 were prefetched on the side stream while their predecessor ran
    assert probe.seen == [(0, [0]), (1, [1]), (2, [2])]
    assert fake.log == ["side stream", "record", "wait", "side stream", "record", "wait"]
    assert swap.loads == 3 and swap.resident_blocks() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_block_swap_is_exact_and_bounded():
    dit = make_tiny_dit(ARCH, seed=5)
    inputs = {k: v.cuda() for k, v in make_inputs(ARCH, grid=(2, 4, 6)).items()}
    want = dit.cuda()(**inputs)
    dit.cpu()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    swap = enable_block_swap(dit, "cuda", blocks_on_device=0)
    rest = torch.cuda.memory_allocated() - base
    per_block = offload.block_bytes(dit.visual_transformer_blocks[0])
    torch.cuda.reset_peak_memory_stats()
    got = dit(**inputs)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert torch.cuda.max_memory_allocated() - base - rest < 2 * per_block + 64 * 2**20
    swap.remove()


def test_budget_plan_of_the_end_to_end_benchmark():
    """benchmarks/end_to_end.py --budget-gb: swap counts and estimated peaks from synthetic headers, by hand."""
    import importlib.util
    from pathlib import Path

    from kandinsky_core import pipeline

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "end_to_end.py"
    spec = importlib.util.spec_from_file_location("k5_end_to_end", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    mib = 2**20 // 2  # values per MiB in bf16
    layer = lambda i, n: {f"model.layers.{i}.mlp.weight": ("BF16", (n, mib))}  # noqa: E731 - n MiB
    qwen = {"model.embed_tokens.weight": ("BF16", (64, 16)), "lm_head.weight": ("BF16", (1000, mib))}
    for i in range(4):
        qwen |= layer(i, 100)
    dit = {"time_embeddings.w": ("BF16", (50, mib))}
    for i in range(32):
        dit[f"visual_transformer_blocks.{i}.w"] = ("BF16", (10, mib))
    headers = dict(
        qwen=qwen, clip={"w": ("F32", (1, 2**20 // 4))}, dit=dit,  # CLIP: 1 MiB in float32
        vae={"decoder.conv_out.conv.weight": ("BF16", (3, 128, 3, 3, 3))},
    )  # fmt: skip
    request = pipeline.resolve_request("t2v-lite-sft-5s", "a fox", width=768, height=512, frames=121)
    full = e2e.plan_budget(request, headers, None, torch.bfloat16)
    assert full["settings"] == dict(text_block_swap=None, block_swap=None, vae_tiled="auto")
    text_act = 256 * 16 * 12 * 2 / 2**30  # text_max_length x hidden (the embedding's width) x 12 values, bf16
    assert full["estimate"]["text"] == pytest.approx((400 + 1) / 1024 + 64 * 16 * 2 / 2**30 + text_act)
    tokens = 31 * 32 * 48
    dit_act = tokens * (8 * 1792 + 2 * 7168) * 2 / 2**30
    assert full["estimate"]["sampling"] == pytest.approx((50 + 320) / 1024 + dit_act)

    # 0.4 GiB, 90% usable = 368.6 MiB < 401 MiB of text weights: Qwen keeps 1 of its 4 layers (1 MiB CLIP + 100
    # resident + 2 x 100 in flight = 301 MiB); the DiT (50 MiB + 2.5 GiB of activations) cannot fit even with every
    # block swapped: 0 resident, and the estimate says it is over
    plan = e2e.plan_budget(request, headers, 0.4, torch.bfloat16)
    assert plan["settings"]["text_block_swap"] == 1 and plan["settings"]["block_swap"] == 0
    assert plan["estimate"]["text"] == pytest.approx((1 + 100 + 200) / 1024 + 64 * 16 * 2 / 2**30 + text_act)
    assert plan["estimate"]["sampling"] == pytest.approx((50 + 20) / 1024 + dit_act)
    assert plan["estimate"]["sampling"] > 0.4
    assert plan["settings"]["vae_tiled"] is True
    assert plan["estimate"]["vae decode"] == pytest.approx((3 * 128 * 27 * 2 + 17 * 256 * 256 * 128 * 2 * 8) / 2**30)


def test_pinned_host_copies_take_their_exact_size_and_are_unpinned_on_remove(monkeypatch):
    """Tensor.pin_memory() rounds every block up to a power of two in CUDA's caching host allocator and keeps it
    pinned after release: block swap registers one buffer of exactly the layer's size instead, and unregisters it
    when swapping ends."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(offload, "_cudart", FakeCudart)
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(4).bfloat16()]
    copies, release = offload.pin_exact(tensors)
    for t, c in zip(tensors, copies, strict=True):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.data_ptr() != t.data_ptr()
    ((kind, ptr, size),) = calls
    assert kind == "register" and size == 3 * 256  # 60, 56 and 8 bytes, each padded to 256, not to powers of two
    swap = offload.swap_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.ModuleList(), "cpu")
    swap._releases.append(release)
    swap.remove()
    assert calls[-1] == ("unregister", ptr)
    release()  # once only
    assert len(calls) == 2
