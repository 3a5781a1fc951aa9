import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kandinsky_core import attention as attn_mod
from kandinsky_core.attention import attention, select_backend
from kandinsky_core.errors import InputError


@pytest.fixture(autouse=True)
def fresh_probes():
    """Forget probed modules, the auto choice and logged lines around every test."""

    def reset():
        attn_mod._module.cache_clear()
        attn_mod._auto_backend.cache_clear()
        attn_mod._logged.clear()
        attn_mod._validated.clear()

    reset()
    yield
    reset()


@pytest.fixture
def no_flash(monkeypatch):
    # None in sys.modules makes `import x` raise ImportError, whatever is installed
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)


def reference_attention(q, k, v, key_mask=None):
    """Explicit float64 softmax(q k^T / sqrt(D)) v with masked keys at -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_auto_selects_sdpa_without_flash(no_flash):
    assert select_backend("auto") == "sdpa"
    assert select_backend(None) == "sdpa"


def test_import_probes_nothing_and_compiles_nothing():
    code = (
        "import sys, kandinsky_core.attention as a, kandinsky_core.nabla as n\n"
        "assert a._module.cache_info().currsize == 0\n"
        "assert n._compiled_flex is None\n"
        "assert not {'flash_attn', 'flash_attn_interface', 'comfy'} & set(sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_missing_backend_is_an_input_error_naming_installed(no_flash):
    with pytest.raises(InputError, match=r"flash_attn_2.*Installed backends: sdpa"):
        select_backend("flash_attn_2")
    with pytest.raises(InputError, match="flash_attn_3"):
        attention(*torch.randn(3, 1, 4, 1, 8), backend="flash_attn_3")


def test_unknown_backend_is_an_input_error():
    with pytest.raises(InputError, match="Allowed"):
        select_backend("sage")


def test_broken_flash_import_is_not_an_error_for_auto(monkeypatch):
    real_import = attn_mod.importlib.import_module

    def broken(name):
        if name.startswith("flash_attn"):
            raise OSError("undefined symbol: _ZN3c10 (built for another torch)")
        return real_import(name)

    monkeypatch.setattr(attn_mod.importlib, "import_module", broken)
    assert select_backend("auto") == "sdpa"


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_explicit_softmax(masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 16, generator=g)
    k = torch.randn(2, 11, 3, 16, generator=g)
    v = torch.randn(2, 11, 3, 16, generator=g)
    key_mask = None
    if masked:
        key_mask = torch.zeros(2, 11, dtype=torch.bool)
        key_mask[0, :4] = True
        key_mask[1, [0, 3, 5, 6, 10]] = True
    out = attention(q, k, v, key_mask=key_mask, backend="sdpa")
    assert out.shape == (2, 7, 3, 16) and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, key_mask), atol=1e-5, rtol=1e-5)
    if masked:  # masked keys really have no influence
        k2, v2 = k.clone(), v.clone()
        k2[~key_mask] = 1e3
        v2[~key_mask] = -1e3
        torch.testing.assert_close(attention(q, k2, v2, key_mask=key_mask, backend="sdpa"), out)


def _fake_flash_module(calls):
    """A flash-attn stand-in computing exact attention on the packed varlen layout it is given."""

    def flash_attn_func(q, k, v):
        calls.append("dense")
        return reference_attention(q, k, v).to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append(("varlen", cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        outs = []
        for i in range(len(cu_q) - 1):
            qi = q[cu_q[i] : cu_q[i + 1]][None]
            ki, vi = k[cu_k[i] : cu_k[i + 1]][None], v[cu_k[i] : cu_k[i + 1]][None]
            outs.append(reference_attention(qi, ki, vi)[0].to(q.dtype))
        return torch.cat(outs), None  # (out, lse), as some flash_attn_interface releases return

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_varlen_packing_matches_masked_attention():
    calls = []
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))
    key_mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    out = attn_mod._flash(_fake_flash_module(calls), q, k, v, key_mask)
    assert calls == [("varlen", [0, 5, 10], [0, 3, 4], 5, 3)]
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, key_mask), atol=1e-6, rtol=1e-6)
    assert out.shape == q.shape and out.is_contiguous()
    out = attn_mod._flash(_fake_flash_module(calls), q, k, v, None)
    assert calls[-1] == "dense"


def test_auto_prefers_flash_and_cpu_falls_back_to_sdpa_logging_once(monkeypatch, caplog):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module(calls))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    caplog.set_level(logging.INFO, logger="kandinsky5")
    q = torch.randn(1, 4, 2, 8)
    for _ in range(3):
        out = attention(q, q, q)
        assert select_backend("auto") == "flash_attn_2"
    assert calls == []  # CPU fp32 tensors never reach flash-attn
    torch.testing.assert_close(out.double(), reference_attention(q, q, q), atol=1e-5, rtol=1e-5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("backend: flash_attn_2 (auto" in m for m in messages) == 1
    assert sum("using SDPA" in m for m in messages) == 1
    assert len(messages) == 2


def test_explicit_backend_logged_once(no_flash, caplog):
    caplog.set_level(logging.INFO, logger="kandinsky5")
    q = torch.randn(1, 4, 2, 8)
    for _ in range(3):
        attention(q, q, q, backend="sdpa")
    assert [r.getMessage() for r in caplog.records] == ["Kandinsky attention backend: sdpa"]


def test_flash_attn_4_bare_namespace_is_not_taken_for_flash_attn_2(monkeypatch):
    """flash-attn 4 installs `flash_attn` as a bare namespace (only flash_attn.cute): importing it succeeds, but it
    has no flash_attn_func, so it must not count as flash-attn 2 (the first CUDA attention would raise
    AttributeError)."""
    namespace = types.ModuleType("flash_attn")
    namespace.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn", namespace)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    assert "flash_attn_2" not in attn_mod.available_backends()
    assert select_backend("auto") == "sdpa"


def fake_cuda_flash(monkeypatch, module_name, module):
    monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(attn_mod, "_on_cuda", lambda x: True)
    monkeypatch.setattr(attn_mod, "_failed", {})


def test_flash_attn_3_without_kernels_for_the_card_falls_back_once(monkeypatch, caplog):
    calls = []

    def unsupported(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("FlashAttention-3 only supports Hopper GPUs (sm90)")

    fa3 = types.SimpleNamespace(flash_attn_func=unsupported, flash_attn_varlen_func=unsupported)
    fake_cuda_flash(monkeypatch, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    q = torch.randn(1, 6, 2, 8).bfloat16()
    caplog.set_level(logging.INFO, logger="kandinsky5")
    for _ in range(3):
        out = attention(q, q, q, backend="auto")
        torch.testing.assert_close(out, attention(q, q, q, backend="sdpa"))
    assert calls == [1]
    assert "sm90" in attn_mod._failed["flash_attn_3"]
    assert sum("flash_attn_3 failed" in r.getMessage() for r in caplog.records) == 1


def test_sageattention_runs_only_when_asked_for_in_nhd_layout(monkeypatch):
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        calls.append((tensor_layout, is_causal))
        return reference_attention(q, k, v).to(q.dtype)

    fake_cuda_flash(monkeypatch, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    assert select_backend("auto") == "sdpa" and "sageattention" in attn_mod.available_backends()
    q = torch.randn(1, 6, 2, 8).bfloat16()
    attention(q, q, q, backend="auto")
    assert calls == []
    out = attention(q, q, q, backend="sageattention")
    assert calls == [("NHD", False)]
    torch.testing.assert_close(out.float(), reference_attention(q, q, q).float(), atol=2e-2, rtol=2e-2)
    key_mask = torch.tensor([[True, True, True, False, False, True]])
    attention(q, q, q, key_mask=key_mask, backend="sageattention")  # no mask support: SDPA, exactly
    assert len(calls) == 1
