"""Kandinsky5DiT against an independent per-sample reference written from the official formulation
(kandinsky/models/{dit,nn,utils}.py: [T, H, W, C] layout, view/permute patchify, 2x2 RoPE matrices,
explicit softmax attention, explicit LayerNorm / RMSNorm / exact GELU), all in float32."""

import math

import pytest
import torch
from tiny import TINY_ARCHS, make_inputs, make_tiny_dit, random_state_dict

from kandinsky_core.errors import InputError
from kandinsky_core.layers import Linear, timestep_embedding
from kandinsky_core.model import Kandinsky5DiT
from kandinsky_core.nabla import NablaParams

torch.set_num_threads(2)


# ---------------------------------------------------------------- reference (batch 1, official layout)
def _lin(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _ln(x, w=None, b=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    return y * w + b if w is not None else y


def _rms(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * w


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _freqs(n):
    return torch.exp(-math.log(10000.0) * torch.arange(n, dtype=torch.float32) / n)


def _rope_mats(args):  # [..., D/2] -> [..., 1 (heads), D/2, 2, 2]
    c, s = torch.cos(args), torch.sin(args)
    return torch.stack([c, -s, s, c], -1).view(*args.shape, 2, 2).unsqueeze(-4)


def _rotary(x, rope):
    return (rope * x.reshape(*x.shape[:-1], -1, 1, 2)).sum(-1).reshape(x.shape)


def _attn(q, k, v, key_mask=None):  # [S, H, D]
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = s.masked_fill(~key_mask[None, None, :], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _mha(sd, p, x, cond, heads, rope=None, key_mask=None):
    q = _lin(sd, p + ".to_query", x).unflatten(-1, (heads, -1))
    k = _lin(sd, p + ".to_key", cond).unflatten(-1, (heads, -1))
    v = _lin(sd, p + ".to_value", cond).unflatten(-1, (heads, -1))
    q, k = _rms(q, sd[p + ".query_norm.weight"]), _rms(k, sd[p + ".key_norm.weight"])
    if rope is not None:
        q, k = _rotary(q, rope), _rotary(k, rope)
    return _lin(sd, p + ".out_layer", _attn(q, k, v, key_mask).flatten(-2))


def _ff(sd, p, x):
    return _lin(sd, p + ".out_layer", _gelu(_lin(sd, p + ".in_layer", x)))


def reference_dit(sd, arch, x, text, pooled, t, mask=None, scale=(1.0, 1.0, 1.0)):
    """x [C, T, H, W], text [L, 3584], pooled [768], t float -> [16, T, H, W]."""
    heads = arch.num_heads
    args = t * _freqs(arch.model_dim // 2)
    temb = torch.cat([torch.cos(args), torch.sin(args)])
    temb = _lin(sd, "time_embeddings.out_layer", torch.nn.functional.silu(_lin(sd, "time_embeddings.in_layer", temb)))
    p = "pooled_text_embeddings"
    temb = temb + _ln(_lin(sd, p + ".in_layer", pooled), sd[p + ".norm.weight"], sd[p + ".norm.bias"])
    txt = _ln(
        _lin(sd, "text_embeddings.in_layer", text), sd["text_embeddings.norm.weight"], sd["text_embeddings.norm.bias"]
    )
    silu_t = torch.nn.functional.silu(temb)

    xv = x.permute(1, 2, 3, 0)
    T, H, W, C = xv.shape
    xv = xv.view(T, 1, H // 2, 2, W // 2, 2, C).permute(0, 2, 4, 1, 3, 5, 6).flatten(3, 6)
    vis = _lin(sd, "visual_embeddings.in_layer", xv)
    h, w = H // 2, W // 2

    L = txt.shape[0]
    text_rope = _rope_mats(torch.arange(L, dtype=torch.float32)[:, None] * _freqs(arch.head_dim // 2))
    for i in range(arch.num_text_blocks):
        b = f"text_transformer_blocks.{i}"
        m = _lin(sd, b + ".text_modulation.out_layer", silu_t).chunk(6)
        y = _ln(txt) * (m[1] + 1) + m[0]
        txt = txt + m[2] * _mha(sd, b + ".self_attention", y, y, heads, text_rope, mask)
        y = _ln(txt) * (m[4] + 1) + m[3]
        txt = txt + m[5] * _ff(sd, b + ".feed_forward", y)

    a0, a1, a2 = (
        torch.arange(n, dtype=torch.float32)[:, None] * _freqs(d // 2) / s
        for n, d, s in zip((T, h, w), arch.axes_dims, scale, strict=True)
    )
    vargs = torch.cat(
        [
            a0.view(T, 1, 1, -1).repeat(1, h, w, 1),
            a1.view(1, h, 1, -1).repeat(T, 1, w, 1),
            a2.view(1, 1, w, -1).repeat(T, h, 1, 1),
        ],
        -1,
    )
    vis_rope = _rope_mats(vargs).flatten(0, 2)
    vis = vis.flatten(0, 2)
    for i in range(arch.num_visual_blocks):
        b = f"visual_transformer_blocks.{i}"
        m = _lin(sd, b + ".visual_modulation.out_layer", silu_t).chunk(9)
        y = _ln(vis) * (m[1] + 1) + m[0]
        vis = vis + m[2] * _mha(sd, b + ".self_attention", y, y, heads, vis_rope)
        y = _ln(vis) * (m[4] + 1) + m[3]
        vis = vis + m[5] * _mha(sd, b + ".cross_attention", y, txt, heads, None, mask)
        y = _ln(vis) * (m[7] + 1) + m[6]
        vis = vis + m[8] * _ff(sd, b + ".feed_forward", y)

    shift, sc = _lin(sd, "out_layer.modulation.out_layer", silu_t).chunk(2)
    out = _lin(sd, "out_layer.out_layer", _ln(vis) * (sc + 1) + shift).view(T, h, w, -1)
    out = out.view(T, h, w, -1, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3).flatten(0, 1).flatten(1, 2).flatten(2, 3)
    return out.permute(3, 0, 1, 2)


def official_keys(arch) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the official DiffusionTransformer3D, enumerated from its source."""
    d, t, f, hd = arch.model_dim, arch.time_dim, arch.ff_dim, arch.head_dim
    keys = {
        "time_embeddings.in_layer.weight": (t, d), "time_embeddings.in_layer.bias": (t,),
        "time_embeddings.out_layer.weight": (t, t), "time_embeddings.out_layer.bias": (t,),
        "text_embeddings.in_layer.weight": (d, 3584), "text_embeddings.in_layer.bias": (d,),
        "text_embeddings.norm.weight": (d,), "text_embeddings.norm.bias": (d,),
        "pooled_text_embeddings.in_layer.weight": (t, 768), "pooled_text_embeddings.in_layer.bias": (t,),
        "pooled_text_embeddings.norm.weight": (t,), "pooled_text_embeddings.norm.bias": (t,),
        "visual_embeddings.in_layer.weight": (d, 4 * arch.in_channels), "visual_embeddings.in_layer.bias": (d,),
        "out_layer.modulation.out_layer.weight": (2 * d, t), "out_layer.modulation.out_layer.bias": (2 * d,),
        "out_layer.out_layer.weight": (64, d), "out_layer.out_layer.bias": (64,),
    }  # fmt: skip

    def attn(p):
        for n in ("to_query", "to_key", "to_value", "out_layer"):
            keys[f"{p}.{n}.weight"], keys[f"{p}.{n}.bias"] = (d, d), (d,)
        keys[f"{p}.query_norm.weight"] = keys[f"{p}.key_norm.weight"] = (hd,)

    def ff(p):
        keys[f"{p}.in_layer.weight"], keys[f"{p}.out_layer.weight"] = (f, d), (d, f)

    for i in range(arch.num_text_blocks):
        p = f"text_transformer_blocks.{i}"
        keys[f"{p}.text_modulation.out_layer.weight"], keys[f"{p}.text_modulation.out_layer.bias"] = (
            (6 * d, t),
            (6 * d,),
        )
        attn(p + ".self_attention")
        ff(p + ".feed_forward")
    for i in range(arch.num_visual_blocks):
        p = f"visual_transformer_blocks.{i}"
        keys[f"{p}.visual_modulation.out_layer.weight"] = (9 * d, t)
        keys[f"{p}.visual_modulation.out_layer.bias"] = (9 * d,)
        attn(p + ".self_attention")
        attn(p + ".cross_attention")
        ff(p + ".feed_forward")
    return keys


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_state_dict_names_and_shapes_are_official(name):
    arch = TINY_ARCHS[name]
    with torch.device("meta"):
        sd = Kandinsky5DiT(arch).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_keys(arch)


@pytest.mark.parametrize(
    "name,grid,scale",
    [("lite", (2, 4, 6), (1.0, 2.0, 2.0)), ("pro", (3, 6, 4), (1.0, 3.16, 3.16)), ("image", (1, 8, 6), (1, 1, 1)),
     ("image_i2i", (1, 4, 4), (1, 1, 1))],
)  # fmt: skip
def test_forward_matches_reference(name, grid, scale):
    arch = TINY_ARCHS[name]
    sd = random_state_dict(arch, seed=1)
    model = make_tiny_dit(arch, seed=1)
    inp = make_inputs(arch, batch=1, grid=grid, text_len=6, seed=2)
    out = model(**inp, rope_scale=scale)
    assert out.shape == (1, 16, *grid) and out.dtype == torch.float32
    ref = reference_dit(sd, arch, inp["x"][0], inp["text_embeds"][0], inp["pooled_text_embeds"][0],
                        inp["timestep"][0], scale=scale)  # fmt: skip
    assert out.abs().max() > 0.5  # random modulation: the output is not trivially small
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)


def test_text_mask_matches_reference_and_ignores_padding():
    arch = TINY_ARCHS["lite"]
    sd = random_state_dict(arch, seed=3)
    model = make_tiny_dit(arch, seed=3)
    inp = make_inputs(arch, batch=1, grid=(1, 4, 4), text_len=5, seed=4)
    plain = model(**inp)
    pad = torch.randn(1, 4, 3584) * 10
    padded = dict(inp, text_embeds=torch.cat([inp["text_embeds"], pad], 1))
    mask = torch.tensor([[True] * 5 + [False] * 4])
    masked = model(**padded, text_mask=mask)
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    ref = reference_dit(sd, arch, padded["x"][0], padded["text_embeds"][0], inp["pooled_text_embeds"][0],
                        inp["timestep"][0], mask=mask[0])  # fmt: skip
    torch.testing.assert_close(masked[0], ref, rtol=1e-4, atol=1e-4)
    assert (model(**padded) - plain).abs().max() > 1e-3  # without the mask the padding does matter


def test_batch_equals_per_sample_runs():
    arch = TINY_ARCHS["pro"]
    model = make_tiny_dit(arch, seed=5)
    inp = make_inputs(arch, batch=3, grid=(2, 4, 4), text_len=7, seed=6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 6:] = False
    out = model(**inp, text_mask=mask, rope_scale=(1, 2, 2))
    for i in range(3):
        n = int(mask[i].sum())
        one = model(inp["x"][i : i + 1], inp["text_embeds"][i : i + 1, :n], inp["pooled_text_embeds"][i : i + 1],
                    inp["timestep"][i : i + 1], rope_scale=(1, 2, 2))  # fmt: skip
        torch.testing.assert_close(out[i : i + 1], one, rtol=1e-5, atol=1e-5)


def test_nabla_full_density_equals_dense():
    arch = TINY_ARCHS["lite"]
    model = make_tiny_dit(arch, seed=7)
    inp = make_inputs(arch, batch=2, grid=(2, 16, 16), text_len=4, seed=8)  # 8x8 tokens per frame: one tile
    dense = model(**inp, rope_scale=(1, 2, 2))
    sparse = model(**inp, rope_scale=(1, 2, 2), nabla=NablaParams(P=1.0, wT=1, wH=1, wW=1))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_nabla_tiling_with_several_tiles_equals_dense_at_full_density():
    arch = TINY_ARCHS["image"]
    model = make_tiny_dit(arch, seed=9)
    inp = make_inputs(arch, batch=1, grid=(1, 32, 16), text_len=3, seed=10)  # 2x1 tiles of 8x8 tokens
    dense = model(**inp)
    sparse = model(**inp, nabla=NablaParams(P=1.0, wT=1, wH=3, wW=3))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_nabla_needs_128px_multiples():
    arch = TINY_ARCHS["lite"]
    model = make_tiny_dit(arch)
    inp = make_inputs(arch, grid=(1, 12, 16))  # 96 x 128 px
    with pytest.raises(InputError, match=r"height=96 must be a multiple of 128 px.*NABLA"):
        model(**inp, nabla=NablaParams(P=0.9))


def test_wrong_channels_is_a_clear_error():
    arch = TINY_ARCHS["lite"]
    model = make_tiny_dit(arch)
    inp = make_inputs(TINY_ARCHS["image"], grid=(1, 4, 4))  # 16 channels into a 33-channel model
    with pytest.raises(InputError, match=r"expected \[B, 33, T, H, W\]"):
        model(**inp)


def test_bad_text_mask_is_a_clear_error():
    arch = TINY_ARCHS["lite"]
    model = make_tiny_dit(arch)
    inp = make_inputs(arch, batch=2, grid=(1, 4, 4), text_len=3)
    with pytest.raises(InputError, match="no real token"):
        model(**inp, text_mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(InputError, match="must match text_embeds"):
        model(**inp, text_mask=torch.ones(2, 4, dtype=torch.bool))


def test_timestep_embedding_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 500.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expect = [math.cos(500 * f) for f in freqs] + [math.sin(500 * f) for f in freqs]
    torch.testing.assert_close(e[1], torch.tensor(expect), rtol=1e-5, atol=1e-5)


def test_fp8_linear_upcasts_at_use():
    lin = Linear(8, 4)
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = lin(x)
    assert out.dtype == torch.bfloat16
    expect = x.float() @ lin.weight.float().T + lin.bias.float()
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=2e-2)


def test_bf16_model_runs_and_stays_close():
    arch = TINY_ARCHS["lite"]
    ref_model = make_tiny_dit(arch, seed=11)
    model = make_tiny_dit(arch, seed=11, dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    inp = make_inputs(arch, grid=(1, 4, 4), seed=12)
    out, ref = model(**inp), ref_model(**inp)
    assert out.dtype == torch.float32  # returned in the input's dtype
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_text_mask_is_read_back_once_per_mask_not_twice_per_forward():
    """Validating the text mask reads it back to the host (a device sync on a GPU): the sampler hands the DiT the
    same mask every step, so it is read once for that tensor, not twice in every forward."""
    from tiny import TINY_ARCHS, make_inputs, make_tiny_dit
    from torch.utils._python_dispatch import TorchDispatchMode

    class Readbacks(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Readbacks.count += 1
            return func(*args, **(kwargs or {}))

    arch = TINY_ARCHS["lite"]
    dit = make_tiny_dit(arch)
    inputs = make_inputs(arch, text_len=6)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    with Readbacks():
        for _ in range(3):
            dit(**inputs, text_mask=mask)
    assert Readbacks.count <= 2, Readbacks.count  # two flags of one copy to the host


def fake_cuda_fusion(monkeypatch, backend):
    from kandinsky_core import layers

    monkeypatch.setattr(layers, "_on_cuda", lambda x: True)
    monkeypatch.setattr(layers, "FUSE_BACKEND", backend)
    monkeypatch.setattr(layers, "_fused_compiled", {})
    monkeypatch.setattr(layers, "fuse_state", {"compiled_calls": 0, "failed": None})
    return layers


def test_float32_helpers_run_compiled_on_cuda_with_the_eager_numbers(monkeypatch):
    """On CUDA, modulation norms, gated residuals and RoPE (float32 elementwise work) run torch.compile'd, as the
    official code compiles its helpers; the float32 math is unchanged (aot_eager here: same graph, no codegen)."""
    from tiny import TINY_ARCHS, make_inputs, make_tiny_dit

    layers = fake_cuda_fusion(monkeypatch, "aot_eager")
    arch = TINY_ARCHS["lite"]
    dit, inputs = make_tiny_dit(arch), make_inputs(arch, grid=(2, 4, 4))
    monkeypatch.setenv("KANDINSKY_FUSE", "0")
    eager = dit(**inputs)
    assert layers.fuse_state["compiled_calls"] == 0
    monkeypatch.delenv("KANDINSKY_FUSE")
    fused = dit(**inputs)
    assert layers.fuse_state["failed"] is None and layers.fuse_state["compiled_calls"] > 0
    assert set(layers._fused_compiled) == {"apply_rope", "scale_shift_norm", "gate_sum"}
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_float32_helpers_fall_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    from tiny import TINY_ARCHS, make_inputs, make_tiny_dit

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no Triton for this GPU")

    layers = fake_cuda_fusion(monkeypatch, broken_backend)
    arch = TINY_ARCHS["lite"]
    dit, inputs = make_tiny_dit(arch), make_inputs(arch, grid=(2, 4, 4))
    with caplog.at_level("WARNING", logger="kandinsky5"):
        out = dit(**inputs)
        out2 = dit(**inputs)
    assert "no Triton" in layers.fuse_state["failed"]
    assert sum("elementwise helpers failed" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("KANDINSKY_FUSE", "0")
    torch.testing.assert_close(out, dit(**inputs), rtol=0, atol=0)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
