"""compile.py: torch.compile of the DiT's blocks is lazy, gives the eager numbers, and a failing compiler falls back to
eager with one warning. The tracing backends ("eager", "aot_eager") keep these tests fast; the real inductor run
(C++ code generation on the CPU, ~1 min) runs with K5_TEST_INDUCTOR=1."""

import logging
import os

import pytest
import test_pipeline
import torch
from tiny import TINY_ARCHS, make_inputs, make_tiny_dit

from kandinsky_core import cli, offload, pipeline
from kandinsky_core.compile import compile_dit, compile_state, uncompile_dit
from kandinsky_core.errors import InputError

torch.set_num_threads(2)
ARCH = TINY_ARCHS["lite_t2v_16ch"]  # one text block, one visual block
INPUTS = dict(grid=(2, 4, 4), text_len=3)


# test_pipeline's tiny models folder (real loaders, official layouts) and its autouse swap of tiny architectures
models_dir, tiny_variants = test_pipeline.models_dir, test_pipeline.tiny_variants
W, H = test_pipeline.W, test_pipeline.H


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(calls: list):
    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm.forward  # runs the traced graph as is

    return backend


def test_compile_is_lazy_and_traced_blocks_give_the_eager_numbers():
    dit = make_tiny_dit(ARCH)
    inputs = make_inputs(ARCH, **INPUTS)
    eager = dit(**inputs)
    calls = []
    assert compile_dit(dit, backend=counting_backend(calls)) is dit
    assert calls == [] and compile_state(dit).compiled_calls == 0  # nothing compiled before the first forward
    out = dit(**inputs)
    assert calls and compile_state(dit).compiled_calls == 2  # the text block and the visual block
    assert torch.equal(out, eager)
    n = len(calls)
    torch.testing.assert_close(dit(**inputs), eager, rtol=0, atol=0)
    assert len(calls) == n  # the same shapes reuse the compiled graphs
    uncompile_dit(dit)
    assert compile_state(dit) is None and all("forward" not in b.__dict__ for b in dit.visual_transformer_blocks)


def test_aot_eager_matches_eager_with_cfg_sized_batches():
    dit = make_tiny_dit(ARCH, seed=1)
    inputs = make_inputs(ARCH, batch=2, **INPUTS)
    eager = dit(**inputs)
    compile_dit(dit, backend="aot_eager")
    torch.testing.assert_close(dit(**inputs), eager, rtol=1e-5, atol=1e-5)
    assert not compile_state(dit).failed


def test_failing_compiler_falls_back_to_eager_with_one_warning(caplog):
    dit = make_tiny_dit(TINY_ARCHS["pro"], seed=2)  # 2 text + 3 visual blocks: one warning, not five
    inputs = make_inputs(TINY_ARCHS["pro"], **INPUTS)
    eager = dit(**inputs)
    attempts = []

    def broken(gm, example_inputs):
        attempts.append(1)
        raise RuntimeError("no C++ compiler found")

    compile_dit(dit, backend=broken)
    with caplog.at_level(logging.WARNING, logger="kandinsky_core.compile"):
        first = dit(**inputs)
        second = dit(**inputs)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    warnings = [r for r in caplog.records if r.name == "kandinsky_core.compile"]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert "running the DiT without compiling" in warnings[0].getMessage()
    state = compile_state(dit)
    assert state.failed and state.compiled_calls == 0 and state.eager_calls == 10  # 5 blocks x 2 calls
    assert len(attempts) == 1  # after the failure the compiler is not tried again


def test_block_swap_hooks_still_run_around_compiled_blocks():
    dit = make_tiny_dit(TINY_ARCHS["pro"], seed=3)
    inputs = make_inputs(TINY_ARCHS["pro"], **INPUTS)
    eager = dit(**inputs)
    swap = offload.enable_block_swap(dit, torch.device("cpu"), blocks_on_device=1, prefetch=False)
    compile_dit(dit, backend="eager")
    out = dit(**inputs)
    assert swap.loads == 2 and compile_state(dit).compiled_calls == 5  # blocks 1 and 2 were swapped in
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    swap.remove()


def test_bad_mode_and_non_dit_are_refused():
    with pytest.raises(InputError, match="compile mode 'fastest' is not allowed. Allowed: None, default"):
        compile_dit(make_tiny_dit(ARCH), mode="fastest")
    with pytest.raises(InputError, match="needs a Kandinsky5DiT; got Linear"):
        compile_dit(torch.nn.Linear(2, 2))


def test_generate_compile_flag_reaches_run(tmp_path, monkeypatch):
    seen = {}

    def fake_run(request, models, **kw):
        seen.update(kw)
        return torch.zeros(request.frames, request.height, request.width, 3, dtype=torch.uint8)

    monkeypatch.setattr(pipeline, "run", fake_run)
    files = []
    for name in ("dit.safetensors", "qwen", "clip", "vae"):
        path = tmp_path / name
        path.write_bytes(b"") if "." in name else path.mkdir()
        files.append(str(path))
    args = ["generate", "--variant", "t2i-lite", "--prompt", "a fox", "--output", str(tmp_path / "o.png"), "--quiet"]
    args += ["--dit", files[0], "--text-encoder", files[1], "--clip", files[2], "--vae", files[3]]
    assert cli.main(args) == 0 and seen["compile"] is False
    assert cli.main([*args, "--overwrite", "--compile"]) == 0 and seen["compile"] is True


def test_pipeline_compile_compiles_the_dit_and_gives_the_same_frames(models_dir, monkeypatch):
    from kandinsky_core import compile as core_compile

    compiled = []
    real = core_compile.compile_dit
    monkeypatch.setattr(core_compile, "compile_dit", lambda dit, **k: compiled.append(real(dit, backend="eager")))
    kw = dict(models=models_dir, width=W, height=H, frames=1, steps=1, progress=False)
    plain = pipeline.generate("t2v-lite-sft-5s", "a fox", **kw)
    assert compiled == []
    frames = pipeline.generate("t2v-lite-sft-5s", "a fox", compile=True, **kw)
    (dit,) = compiled
    assert compile_state(dit).compiled_calls > 0 and not compile_state(dit).failed
    assert torch.equal(frames, plain)


@pytest.mark.skipif(
    os.environ.get("K5_TEST_INDUCTOR") != "1", reason="inductor on the CPU takes ~1 min: set K5_TEST_INDUCTOR=1"
)
def test_inductor_matches_eager_on_cpu():
    dit = make_tiny_dit(ARCH, seed=4)
    inputs = make_inputs(ARCH, **INPUTS)
    eager = dit(**inputs)
    compile_dit(dit)
    out = dit(**inputs)
    state = compile_state(dit)
    assert not state.failed, state.error
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_auto_attention_backend_does_not_break_compiled_graphs():
    """The DiT resolves "auto" once per forward and hands the name to its (compiled) blocks; looking that name up
    again must not probe flash-attn imports inside the graph (importlib is a graph break)."""
    from kandinsky_core import attention

    attention._validated.clear()
    name = attention.select_backend("auto")
    q = torch.randn(1, 8, 2, 16)
    fn = torch.compile(lambda q: attention.attention(q, q, q, backend=name), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q), attention.attention(q, q, q, backend="sdpa"))


def test_recompile_limit_is_reported_as_a_fallback_not_run_eager_silently(caplog):
    """With dynamic=False every new shape recompiles each block; past torch's limit (8) dynamo would run the blocks
    eagerly while CompileState kept counting compiled calls."""
    from tiny import TINY_ARCHS, make_inputs, make_tiny_dit

    dit = compile_dit(make_tiny_dit(TINY_ARCHS["lite"]), backend="eager", dynamic=False)
    with caplog.at_level("WARNING"):
        for length in range(1, 12):
            dit(**make_inputs(TINY_ARCHS["lite"], text_len=length))
    state = compile_state(dit)
    assert state.failed and "recompile" in state.error.lower(), state
    assert state.eager_calls > 0


def test_compile_node_max_autotune_runs_without_cuda_graphs(comfy_api):
    from tiny import TINY_ARCHS, make_tiny_dit

    from nodes.compile import CompileSetting

    dit = make_tiny_dit(TINY_ARCHS["lite"])
    with CompileSetting("max-autotune", "eager").applied(dit) as state:
        assert state.mode == "max-autotune-no-cudagraphs"
