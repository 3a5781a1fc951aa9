"""Cancel stops every long stage within one block (issue 11.6): text encode (per layer), prompt expansion (per
layer of each generated token), sampling (per DiT block) and VAE decode (per VAE block, in every tile).

Cancel is pressed while one block runs (a hook on that block sets ComfyUI's interrupt flag); no block may complete
after it. Without the checks between blocks, the stage runs on to its end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nodes import TINY_NAME, TINY_T2V, Interrupted, comfy, run_sampler_node  # noqa: E402,F401

from kandinsky_core.cancel import blocks  # noqa: E402
from nodes import comfy_glue, loaders, text  # noqa: E402
from nodes import vae as vae_node


class Cancel:
    """Presses Cancel when the `at`-th block of `roots` finishes; counts the blocks that finish after that."""

    def __init__(self, monkeypatch, roots, at: int):
        self.pressed = False
        self.finished_after = 0
        self.finished = 0

        def check():
            if self.pressed:
                raise Interrupted("processing interrupted")

        def done(*_):
            self.finished += 1
            if self.pressed:
                self.finished_after += 1
            elif self.finished == at:
                self.pressed = True

        monkeypatch.setattr(comfy_glue, "check_interrupted", check)
        self.handles = [m.register_forward_hook(done) for m in blocks(*roots)]
        assert len(self.handles) >= 2

    def remove(self):
        for h in self.handles:
            h.remove()


def tiny_text_encoders(tmp_path):
    import tiny_text

    from kandinsky_core.text_encoders import load_text_encoders

    t = tiny_text.make_tiny_text_encoders(tmp_path / "te", "folder")
    enc = load_text_encoders(t.qwen, t.clip, dtype=torch.float32, qwen_config=t.qwen_config, clip_config=t.clip_config)
    module = torch.nn.ModuleDict({"qwen": enc.qwen, "clip": enc.clip})
    return loaders.TextEncodersModel(comfy_glue.wrap(module, "text"), enc)


@pytest.mark.usefixtures("comfy")
def test_text_encode_stops_within_one_layer(tmp_path, monkeypatch):
    te = tiny_text_encoders(tmp_path)
    cancel = Cancel(monkeypatch, (te.encoders.qwen, te.encoders.clip), at=1)
    with pytest.raises(Interrupted):
        text.TextEncode.execute(te, "a fox", "blurry", "video")
    assert cancel.pressed and cancel.finished_after == 0
    cancel.remove()
    monkeypatch.setattr(comfy_glue, "check_interrupted", lambda: None)
    pos, _ = text.TextEncode.execute(te, "a fox", "blurry", "video")  # the next run works
    assert pos[0][0].ndim == 3


@pytest.mark.usefixtures("comfy")
def test_prompt_expansion_stops_within_one_token(tmp_path, monkeypatch):
    te = tiny_text_encoders(tmp_path)
    layers = len(te.encoders.qwen.model.language_model.layers)
    cancel = Cancel(monkeypatch, (te.encoders.qwen,), at=3 * layers)  # during the third forward pass
    with pytest.raises(Interrupted):
        text.PromptExpansion.execute(te, "a fox", "video", 0, 64)
    assert cancel.pressed and cancel.finished_after == 0


def test_sampling_stops_within_one_dit_block(request, monkeypatch):
    fake = request.getfixturevalue("comfy")
    from tiny import make_tiny_dit_file

    make_tiny_dit_file(fake.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    (model,) = loaders.LoadDiT.execute(TINY_NAME, "auto", "fp32", "auto")
    cancel = Cancel(monkeypatch, (model.model.diffusion_model,), at=2)
    with pytest.raises(Interrupted):
        run_sampler_node(model, steps=10)
    assert cancel.pressed and cancel.finished_after == 0
    assert fake.progress == []  # inside the first step


@pytest.mark.parametrize("tiling", ["off", "on"])
def test_vae_decode_stops_within_one_block_of_one_tile(request, monkeypatch, tiling):
    fake = request.getfixturevalue("comfy")
    import tiny_vae

    tiny_vae.write_diffusers_folder(fake.root / "vae" / "HunyuanVideo" / "vae", seed=0)
    (vae,) = loaders.LoadVAE.execute("HunyuanVideo/vae/", "fp32")
    latent = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cancel = Cancel(monkeypatch, (vae.vae,), at=2)
    with pytest.raises(Interrupted):
        vae_node.VAEDecode.execute(vae, {"samples": latent}, tiling, 64, 16, 8, 4)
    assert cancel.pressed and cancel.finished_after == 0
