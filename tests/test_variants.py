"""The variants table against the official configs (numbers copied by hand from configs/*.yaml and README)."""

import pytest

from kandinsky_core.errors import InputError
from kandinsky_core.settings import resolve, uses_cfg
from kandinsky_core.variants import VARIANTS, get_variant, seconds_to_frames, variants_markdown

# name -> (config file, steps, guidance, NABLA P or None, rope scale, scheduler scale), from configs/*.yaml
# (scheduler_scale from metrics.scheduler_scale, else the pipeline default: 10 for video, 3 for image).
OFFICIAL = {
    "t2v-lite-sft-5s": ("k5_lite_t2v_5s_sft_sd.yaml", 50, 5.0, None, (1, 2, 2), 10),
    "t2v-lite-sft-10s": ("k5_lite_t2v_10s_sft_sd.yaml", 50, 5.0, 0.9, (1, 2, 2), 10),
    "t2v-lite-pretrain-5s": ("k5_lite_t2v_5s_pretrain_sd.yaml", 50, 5.0, None, (1, 2, 2), 10),
    "t2v-lite-pretrain-10s": ("k5_lite_t2v_10s_pretrain_sd.yaml", 50, 5.0, 0.9, (1, 2, 2), 10),
    "t2v-lite-nocfg-5s": ("k5_lite_t2v_5s_nocfg_sd.yaml", 50, 1.0, None, (1, 2, 2), 10),
    "t2v-lite-nocfg-10s": ("k5_lite_t2v_10s_nocfg_sd.yaml", 50, 1.0, 0.9, (1, 2, 2), 10),
    "t2v-lite-distilled16steps-5s": ("k5_lite_t2v_5s_distil_sd.yaml", 16, 1.0, None, (1, 2, 2), 5),
    "t2v-lite-distilled16steps-10s": ("k5_lite_t2v_10s_distil_sd.yaml", 16, 1.0, 0.9, (1, 2, 2), 10),
    "i2v-lite-5s": ("k5_lite_i2v_5s_sft_sd.yaml", 50, 5.0, None, (1, 2, 2), 10),
    "t2v-pro-sft-5s-sd": ("k5_pro_t2v_5s_sft_sd.yaml", 50, 5.0, None, (1, 2, 2), 10),
    "t2v-pro-sft-5s-hd": ("k5_pro_t2v_5s_sft_hd.yaml", 50, 5.0, 0.8, (1, 3.16, 3.16), 10),
    "t2v-pro-sft-10s-sd": ("k5_pro_t2v_10s_sft_sd.yaml", 50, 5.0, 0.9, (1, 2, 2), 10),
    "t2v-pro-sft-10s-hd": ("k5_pro_t2v_10s_sft_hd.yaml", 50, 5.0, 0.7, (1, 3.16, 3.16), 10),
    "i2v-pro-5s-sd": ("k5_pro_i2v_5s_sft_sd.yaml", 50, 5.0, None, (1, 2, 2), 10),
    "i2v-pro-5s-hd": ("k5_pro_i2v_5s_sft_hd.yaml", 50, 5.0, 0.8, (1, 3.16, 3.16), 5),
    "t2i-lite": ("k5_lite_t2i_sft_hd.yaml", 50, 3.5, None, (1, 1, 1), 3),
    "i2i-lite": ("k5_lite_i2i_sft_hd.yaml", 50, 3.5, None, (1, 1, 1), 3),
}
# variants without an official config take the numbers of their sft sibling
SIBLINGS = {
    "t2v-pro-pretrain-5s-sd": "t2v-pro-sft-5s-sd",
    "t2v-pro-pretrain-5s-hd": "t2v-pro-sft-5s-hd",
    "t2v-pro-pretrain-10s-sd": "t2v-pro-sft-10s-sd",
    "t2v-pro-pretrain-10s-hd": "t2v-pro-sft-10s-hd",
    "t2i-lite-pretrain": "t2i-lite",
    "i2i-lite-pretrain": "i2i-lite",
}


def test_table_covers_every_release():
    assert set(VARIANTS) == set(OFFICIAL) | set(SIBLINGS)
    assert len(VARIANTS) == 23


@pytest.mark.parametrize("name", sorted(set(OFFICIAL) | set(SIBLINGS)))
def test_numbers_match_official_configs(name):
    v = get_variant(name)
    config, steps, guidance, p, rope, sched = OFFICIAL[SIBLINGS.get(name, name)]
    assert v.config == (config if name in OFFICIAL else None)
    assert (v.steps, v.guidance, v.rope_scale, v.scheduler_scale) == (steps, guidance, rope, sched)
    if p is None:
        assert v.nabla is None
    else:
        assert (v.nabla.P, v.nabla.wT, v.nabla.wH, v.nabla.wW) == (p, 11, 3, 3)
    assert uses_cfg(v.guidance) == (guidance != 1.0)


def test_architectures():
    lite, pro, img, edit = (
        get_variant(n).arch for n in ("t2v-lite-sft-5s", "t2v-pro-sft-5s-sd", "t2i-lite", "i2i-lite")
    )
    assert (lite.model_dim, lite.ff_dim, lite.time_dim, lite.num_text_blocks, lite.num_visual_blocks) == (
        1792, 7168, 512, 2, 32)  # fmt: skip
    assert lite.axes_dims == (16, 24, 24) and lite.head_dim == 64 and lite.num_heads == 28
    assert (pro.model_dim, pro.ff_dim, pro.time_dim, pro.num_text_blocks, pro.num_visual_blocks) == (
        4096, 16384, 1024, 4, 60)  # fmt: skip
    assert pro.axes_dims == (32, 48, 48) and pro.head_dim == 128 and pro.num_heads == 32
    assert (img.model_dim, img.ff_dim, img.time_dim, img.num_text_blocks, img.num_visual_blocks) == (
        2560, 10240, 512, 2, 50)  # fmt: skip
    assert img.num_heads == 20
    # every video DiT has visual_cond (33 channels), T2I has 16, I2I instruct channels 33
    assert lite.in_channels == pro.in_channels == edit.in_channels == 33 and img.in_channels == 16
    assert edit.instruct and not img.instruct and not img.visual_cond


def test_checkpoints_and_encoders():
    v = get_variant("t2v-lite-sft-5s")
    assert v.hf_repo == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s"
    assert v.hf_filename == "model/kandinsky5lite_t2v_sft_5s.safetensors"
    assert get_variant("i2v-lite-5s").hf_filename == "model/kandinsky5lite_i2v_5s.safetensors"
    assert get_variant("i2v-pro-5s-hd").hf_repo == "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s"
    assert get_variant("t2v-pro-pretrain-10s-hd").hf_filename == "model/kandinsky5pro_t2v_pretrain_10s.safetensors"
    assert get_variant("t2v-lite-distilled16steps-10s").hf_filename == (
        "model/kandinsky5lite_t2v_distilled16steps_10s.safetensors"
    )
    assert get_variant("t2i-lite").hf_filename == "model/kandinsky5lite_t2i.safetensors"
    assert get_variant("i2i-lite").hf_filename == "model/kandinsky5lite_i2i.safetensors"
    for v in VARIANTS.values():
        if v.is_video:
            assert (v.vae, v.latent_scale, v.text_max_length) == ("hunyuan", 0.476986, 256)
            assert v.text_template == "video"  # official generate_sample_i2v encodes I2V prompts as "video"
        else:
            assert (v.vae, v.latent_scale, v.text_max_length) == ("flux", 0.3611, 512)
            assert v.text_template == ("image" if v.task == "t2i" else "image_edit")
    assert get_variant("t2v-lite-distilled16steps-10s").is_distilled
    assert not get_variant("t2v-lite-nocfg-10s").is_distilled


def test_frames():
    assert seconds_to_frames(5) == 121 and seconds_to_frames(10) == 241
    assert get_variant("t2v-lite-sft-5s").default_frames == 121
    assert get_variant("t2v-pro-sft-10s-hd").max_frames == 241
    assert get_variant("t2i-lite").max_frames == 1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_consistent(name):
    v = get_variant(name)
    assert v.default_size in v.resolutions
    for w, h in v.resolutions:  # trained sizes work with the variant's NABLA tiling
        has = {"has_start": v.task == "i2v", "has_edit": v.task == "i2i"}
        assert resolve(v, width=w, height=h, length=v.default_frames, **has)[1] == []
    assert (v.max_frames - 1) % 4 == 0
    assert v.hf_filename.startswith("model/") and v.hf_filename.endswith(".safetensors")
    assert v.hf_repo.startswith("kandinskylab/Kandinsky-5.0-")
    hd = v.quality == "hd"
    assert v.resolutions[0] == ((1024, 1024) if hd else (512, 512))
    assert v.family in v.hf_filename or v.family == "image"


def test_resolutions_are_width_height():
    # t2v_pipeline.RESOLUTIONS[512] lists (height, width) = (512, 768): a portrait 512 wide, 768 high
    assert get_variant("t2v-lite-sft-5s").resolutions == ((512, 512), (768, 512), (512, 768))
    assert (1408, 640) in get_variant("t2v-pro-sft-5s-hd").resolutions


def test_get_variant_errors():
    with pytest.raises(InputError) as e:
        get_variant("t2v-lite-sft-50s")
    msg = str(e.value)
    assert "did you mean" in msg.lower() and "t2v-lite-sft-5s" in msg and "i2i-lite" in msg
    assert get_variant(" T2V-Lite-SFT-5s ").name == "t2v-lite-sft-5s"


def test_markdown_lists_every_variant():
    md = variants_markdown()
    for name, v in VARIANTS.items():
        assert f"`{name}`" in md and v.hf_repo in md
    assert md.count("\n") == len(VARIANTS) + 2
