"""kandinsky_core's side of our patches on ComfyUI's own Kandinsky 5 model: NABLA on raster-ordered tokens, and the
variant a model known only by its tensors gets (NABLA auto, the Sampler's run, MagCache's official ratios)."""

import pytest
import torch

from kandinsky_core import variants
from kandinsky_core.errors import WeightsError
from kandinsky_core.loading import magcache_variant, nabla_variant, variant_for_run
from kandinsky_core.magcache import OFFICIAL_MAG_RATIOS
from kandinsky_core.model import Kandinsky5DiT
from kandinsky_core.nabla import NablaParams, nabla_attention, nabla_attention_raster, tile_tokens, untile_tokens


def shapes(arch: variants.DiTArch) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Kandinsky5DiT(arch).state_dict().items()}


def test_nabla_on_raster_tokens_equals_nabla_on_tiled_tokens():
    """The permutation argument: tiling q, k, v (raster order) inside, attending and untiling gives what a model
    that keeps its tokens tiled gets, and the same block mask."""
    g = torch.Generator().manual_seed(0)
    grid = (3, 16, 24)
    q, k, v = (torch.randn(1, 3 * 16 * 24, 2, 16, generator=g) for _ in range(3))
    params = NablaParams(P=0.6, wT=1, wH=1, wW=1)
    out, mask = nabla_attention_raster(q, k, v, grid, params, return_mask=True, executor="sdpa")
    tiled, tiled_mask = nabla_attention(
        tile_tokens(q, grid), tile_tokens(k, grid), tile_tokens(v, grid), grid, params, return_mask=True,
        executor="sdpa",
    )  # fmt: skip
    assert torch.equal(mask, tiled_mask) and 0.1 < mask.float().mean() < 0.9
    assert torch.allclose(out, untile_tokens(tiled, grid), atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert (out - dense.transpose(1, 2)).abs().max() > 1e-3  # the mask is sparse enough to matter


def test_nabla_auto_for_a_model_known_by_its_tensors():
    lite, said = nabla_variant(shapes(variants.LITE_VIDEO), 768, 512)
    assert lite.name == "t2v-lite-sft-10s" and "P=0.9, windows wT=11 wH=3 wW=3" in said and "t2v-lite-sft-5s" in said
    pro, said = nabla_variant(shapes(variants.PRO_VIDEO), 1280, 768)
    assert pro.quality == "hd" and pro.nabla is not None and pro.name in said
    image, said = nabla_variant(shapes(variants.IMAGE_T2I), 1024, 1024)
    assert image.nabla is None and "dense attention" in said


def test_the_samplers_variant_for_a_model_known_by_its_tensors():
    lite = shapes(variants.LITE_VIDEO)
    assert variant_for_run(lite, 121)[0].name == "t2v-lite-sft-5s"
    assert variant_for_run(lite, 241)[0].name == "t2v-lite-sft-10s"
    assert variant_for_run(lite, 121, "start")[0].name == "i2v-lite-5s"
    assert variant_for_run(shapes(variants.IMAGE_I2I), 1, "edit")[0].name == "i2i-lite"
    assert "the same tensors fit" in variant_for_run(lite, 121)[1]


def test_magcache_ratios_for_a_model_known_by_its_tensors():
    v, said = magcache_variant(shapes(variants.LITE_VIDEO), OFFICIAL_MAG_RATIOS)
    assert v.name == "t2v-lite-sft-10s" and v.name in said
    with pytest.raises(WeightsError, match="none of them has official MagCache ratios"):
        magcache_variant(shapes(variants.LITE_VIDEO), ["t2i-lite"])
