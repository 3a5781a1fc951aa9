"""The node layer without a running ComfyUI: the nodes are V3 nodes built on ComfyUI's real `comfy_api` (from the
ComfyUI source, tests/conftest.py); fake `folder_paths` / `comfy.*` / `latent_preview` modules record what the nodes
ask of ComfyUI, and the nodes run on tiny real-weight files against kandinsky_core called directly.
(The real ComfyUI runs in tests/integration.)"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from node_ids_expected import EXPECTED_IDS
from prerequisites import require_comfy_api
from tiny import TINY_ARCHS, make_tiny_dit_file

require_comfy_api(module_level=True)  # before the node layer is imported

from comfy_api.latest import io  # noqa: E402

from kandinsky_core import variants  # noqa: E402
from kandinsky_core.errors import InputError, WeightsError  # noqa: E402
from kandinsky_core.sampling import TextConditioning, dit_to_latent, latent_to_dit, make_noise, sample  # noqa: E402
from nodes import NODES, comfy_glue, comfy_model, common, files, loaders, node_ids, text  # noqa: E402
from nodes import sampler as sampler_node  # noqa: E402
from nodes import vae as vae_node  # noqa: E402
from nodes.model_options import options_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


class FakeComfy:
    """Stand-ins for the ComfyUI modules the nodes use; they record calls."""

    def __init__(self, root: Path):
        self.root = root
        self.loads: list[tuple[object, int]] = []
        self.progress: list[tuple[int, int, object]] = []
        self.previews: list[torch.Tensor] = []
        self.interrupt_at: int | None = None
        self.steps_seen = 0

    def modules(self) -> dict[str, types.ModuleType]:
        fake = self
        fp = types.ModuleType("folder_paths")
        fp.get_folder_paths = lambda kind: [str(fake.root / kind)]
        fp.get_filename_list = lambda kind: sorted(
            p.relative_to(fake.root / kind).as_posix() for p in (fake.root / kind).rglob("*") if p.is_file()
        )
        fp.get_full_path = lambda kind, name: (
            str(fake.root / kind / name) if (fake.root / kind / name).is_file() else None
        )

        comfy = types.ModuleType("comfy")
        comfy.__file__ = None  # as in ComfyUI: comfy/ has no __init__.py (a namespace package)
        comfy.__path__ = [str(fake.root / "comfy")]
        mm = types.ModuleType("comfy.model_management")
        mm.__file__ = str(fake.root / "comfy" / "model_management.py")
        cpu = torch.device("cpu")
        mm.get_torch_device = lambda: cpu
        mm.unet_offload_device = mm.text_encoder_offload_device = mm.vae_offload_device = lambda: cpu

        def load_models_gpu(models, memory_required=0):
            fake.loads += [(m, memory_required) for m in models]

        def interrupted():
            if fake.interrupt_at is not None and fake.steps_seen >= fake.interrupt_at:
                raise Interrupted("processing interrupted")
            fake.steps_seen += 1

        mm.load_models_gpu = load_models_gpu
        mm.throw_exception_if_processing_interrupted = interrupted
        patcher = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                self.patches: dict[str, list] = {}
                self.model_options: dict = {"transformer_options": {}}

            def clone(self):
                # as ComfyUI: patches and model options (dicts / lists copied, their values shared) come along
                n = ModelPatcher(self.model, self.load_device, self.offload_device)
                n.patches = {k: list(v) for k, v in self.patches.items()}
                n.model_options = {**self.model_options}
                return n

            def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
                # as ComfyUI: keys of the model's state dict only, (strength, patch, strength_model, offset, function)
                sd = self.model.state_dict()
                for k, v in patches.items():
                    if k in sd:
                        self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                return [k for k in patches if k in sd]

        patcher.ModelPatcher = ModelPatcher
        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total, preview))

        utils.ProgressBar = ProgressBar
        formats = types.ModuleType("comfy.latent_formats")

        class Format:
            def __init__(self, scale, shift=0.0):
                self.scale, self.shift = scale, shift

            def process_in(self, latent):
                return (latent - self.shift) * self.scale

        formats.HunyuanVideo = type(
            "HunyuanVideo", (Format,), {"__init__": lambda self: Format.__init__(self, 0.476986)}
        )
        formats.Flux = type("Flux", (Format,), {"__init__": lambda self: Format.__init__(self, 0.3611, 0.1159)})
        # what nodes/comfy_model.py builds Kandinsky5Model on (the real ones run in tests/integration)
        base = types.ModuleType("comfy.model_base")

        class BaseModel(torch.nn.Module):
            def __init__(self, model_config, model_type=None, device=None):
                super().__init__()
                self.model_config, self.model_type, self.device = model_config, model_type, device
                self.latent_format = model_config.latent_format
                self.current_patcher = None

        base.BaseModel = BaseModel
        base.ModelType = types.SimpleNamespace(FLOW="FLOW")
        supported = types.ModuleType("comfy.supported_models_base")

        class BASE:
            sampling_settings: dict = {}
            latent_format = Format

            def __init__(self, unet_config):
                self.unet_config = dict(unet_config)

        supported.BASE = BASE
        conds = types.ModuleType("comfy.conds")
        conds.CONDRegular = type("CONDRegular", (), {"__init__": lambda self, cond: setattr(self, "cond", cond)})
        preview = types.ModuleType("latent_preview")

        class Previewer:
            def decode_latent_to_preview_image(self, fmt, x0):
                fake.previews.append(x0.clone())
                return ("JPEG", "image", 512)

        preview.get_previewer = lambda device, latent_format: Previewer()
        adapter = types.ModuleType("comfy.weight_adapter")
        adapter_base = types.ModuleType("comfy.weight_adapter.base")
        adapter_base.WeightAdapterBase = type("WeightAdapterBase", (), {})
        adapter.base = adapter_base
        comfy.model_management, comfy.model_patcher, comfy.utils = mm, patcher, utils
        comfy.weight_adapter = adapter
        comfy.latent_formats = formats
        comfy.model_base, comfy.supported_models_base, comfy.conds = base, supported, conds
        return {
            "comfy.model_base": base,
            "comfy.supported_models_base": supported,
            "comfy.conds": conds,
            "folder_paths": fp,
            "comfy": comfy,
            "comfy.model_management": mm,
            "comfy.model_patcher": patcher,
            "comfy.utils": utils,
            "comfy.latent_formats": formats,
            "comfy.weight_adapter": adapter,
            "comfy.weight_adapter.base": adapter_base,
            "latent_preview": preview,
        }


TEXT_DIM = 8
TINY_T2V = dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM)
TINY_NAME = "kandinsky5lite_t2v_sft_5s.safetensors"


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = FakeComfy(tmp_path / "models")
    for kind in ("diffusion_models", "text_encoders", "vae", "loras"):
        (fake.root / kind).mkdir(parents=True)
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "comfy.ops", raising=False)
    comfy_model.model_class.cache_clear()  # Kandinsky5Model on this test's fake BaseModel
    monkeypatch.setitem(
        variants.VARIANTS, "t2v-lite-sft-5s", dataclasses.replace(variants.VARIANTS["t2v-lite-sft-5s"], arch=TINY_T2V)
    )
    return fake


def conditioning(seed: int, length: int = 4) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(
        torch.randn(1, length, TEXT_DIM, generator=g),
        torch.ones(1, length, dtype=torch.bool),
        torch.randn(1, TEXT_DIM, generator=g),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Node definitions


def test_every_node_is_a_v3_node_with_its_id_display_name_category_and_output_tooltips(comfy):
    assert all(issubclass(cls, io.ComfyNode) for cls in NODES)
    schemas = {cls: cls.GET_SCHEMA() for cls in NODES}  # ComfyUI's own checks of a schema (unique input ids, ...)
    assert {s.node_id: s.display_name for s in schemas.values()} == EXPECTED_IDS
    assert set(node_ids()) == set(EXPECTED_IDS) and len(NODES) == len(EXPECTED_IDS)
    for schema in schemas.values():
        assert schema.category.startswith("Kandinsky 5/") and schema.description, schema.node_id
        for out in schema.outputs:
            assert out.display_name and out.tooltip, f"{schema.node_id}: output {out.display_name} has no tooltip"


def test_the_extension_lists_every_node(comfy):
    import asyncio

    from comfy_api.latest import ComfyExtension

    from nodes import K5Extension

    assert isinstance(K5Extension(), ComfyExtension)
    assert asyncio.run(K5Extension().get_node_list()) == NODES


def test_every_input_has_a_tooltip_and_reaches_execute(comfy):
    for cls in NODES:
        schema = cls.define_schema()
        params = inspect.signature(cls.execute).parameters
        for i in schema.inputs:
            assert i.tooltip, f"{schema.node_id}.{i.id} has no tooltip"
            assert i.id in params, f"{schema.node_id}.{i.id} is not a parameter of execute"
            if i.optional:
                assert params[i.id].default is None
        assert set(params) == {i.id for i in schema.inputs}, schema.node_id
        if "validate_inputs" in vars(cls):  # ComfyUI passes widget values by name, linked inputs as None
            taken = inspect.signature(cls.validate_inputs).parameters
            assert set(taken) <= {i.id for i in schema.inputs}, schema.node_id
            for i in schema.inputs:  # an optional input left unconnected is not passed at all
                if i.id in taken and i.optional:
                    assert taken[i.id].default is None, f"{schema.node_id}.{i.id}"


def test_vae_decode_tile_sizes_are_advanced_inputs_where_comfyui_has_them(comfy):
    """v0.33.0's Int.Input takes advanced=True (the frontend folds such widgets away); v0.3.64's does not, and the node
    still loads there with plain widgets (run on both by `make test`)."""
    has_advanced = "advanced" in inspect.signature(io.Int.Input.__init__).parameters
    spec = {i.id: i.as_dict() for i in vae_node.VAEDecode.define_schema().inputs}
    for name in ("tile_px", "overlap_px", "tile_frames", "overlap_frames"):
        assert spec[name].get("advanced") is (True if has_advanced else None), name
    assert "advanced" not in spec["tiling"]


def test_pack_registers_its_nodes_through_comfy_entrypoint_without_loading_models():
    """ComfyUI imports the pack as a package and calls comfy_entrypoint(); the pack offers no NODE_CLASS_MAPPINGS
    (ComfyUI would take that older API first). Importing loads neither transformers nor ComfyUI's model code, and
    leaves sys.path alone: our `nodes` package can never be found in place of ComfyUI's nodes.py."""
    from prerequisites import comfyui_source

    code = (
        "import asyncio, importlib.util, sys\n"
        f"sys.path.append({str(comfyui_source())!r})\n"
        f"spec = importlib.util.spec_from_file_location('k5pack', {str(REPO / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['k5pack'] = m; spec.loader.exec_module(m)\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "ext = asyncio.run(m.comfy_entrypoint())\n"
        "print(sorted(c.GET_SCHEMA().node_id for c in asyncio.run(ext.get_node_list())))\n"
        "heavy = [n for n in ('transformers', 'comfy.model_management', 'comfy.sd') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        # the engine is imported by its own name, but the pack folder stays off sys.path: `nodes` is ComfyUI's
        f"assert {str(REPO)!r} not in sys.path, 'the pack folder is on sys.path'\n"
        f"assert importlib.util.find_spec('nodes').origin == {str(comfyui_source() / 'nodes.py')!r}\n"
        f"assert sys.modules['kandinsky_core'].__file__ == {str(REPO / 'kandinsky_core' / '__init__.py')!r}\n"
        "from kandinsky_core.errors import KandinskyError\n"
        "assert sys.modules['k5pack.nodes.common'].KandinskyError is KandinskyError  # one engine, not two\n"
    )
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(sorted(EXPECTED_IDS))


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    "args, expected",
    [
        ((768, 512, 121), None),
        ((100, 512, 121), "width=100 must be a multiple of 16 px between 16 and 4096. Nearest: 96 or 112."),
        ((768, 520, 5), "height=520 must be a multiple of 16"),
        ((768, 512, 120), "length=120 frames must be 4k+1"),
        ((768, 512, 1), None),
    ],
)
def test_sampler_validation_of_the_widgets(comfy, args, expected):
    got = sampler_node.Sampler.validate_inputs(*args, -1.0, 0.0)
    assert got is True if expected is None else expected in got


def test_sampler_validation_lists_every_problem_of_the_node(comfy):
    got = sampler_node.Sampler.validate_inputs(100, 520, 120, float("nan"), 99.0)
    lines = got.split("\n")
    assert [line.split("=")[0] for line in lines] == ["width", "height", "length", "guidance", "scheduler_scale"], got


def test_the_model_fit_rules_name_the_node_input_and_the_fix():
    from kandinsky_core.settings import raise_problems, resolve

    def check_fit(v, width, height, length, has_start, has_edit):
        raise_problems(resolve(v, width=width, height=height, length=length, has_start=has_start,
                               has_edit=has_edit)[1])  # fmt: skip

    i2v, lite, pro_hd = (variants.VARIANTS[n] for n in ("i2v-lite-5s", "t2v-lite-sft-5s", "t2v-pro-sft-5s-hd"))
    with pytest.raises(InputError, match="start_latent: i2v-lite-5s is an image-to-video model.*VAE Encode"):
        check_fit(i2v, 768, 512, 121, False, False)
    check_fit(i2v, 768, 512, 121, True, False)
    with pytest.raises(InputError, match="start_latent is given but t2v-lite-sft-5s is a T2V model. Disconnect it"):
        check_fit(lite, 768, 512, 121, True, False)
    with pytest.raises(InputError, match="1280x768 is too large for t2v-lite-sft-5s.*Pro HD"):
        check_fit(lite, 1280, 768, 121, False, False)
    check_fit(pro_hd, 1280, 768, 121, False, False)
    with pytest.raises(InputError, match="at most 121.*or load a 10 s model"):
        check_fit(lite, 768, 512, 241, False, False)
    with pytest.raises(InputError, match="image model and makes 1 frame"):
        check_fit(variants.VARIANTS["t2i-lite"], 1024, 1024, 5, False, False)
    with pytest.raises(InputError, match="edit_latent: i2i-lite"):
        check_fit(variants.VARIANTS["i2i-lite"], 1024, 1024, 1, False, False)


def test_conditioning_round_trip_and_foreign_conditioning():
    c = conditioning(1)
    back = text.from_conditioning(text.to_conditioning(c, "video"), "positive")
    assert torch.equal(back.text_embeds, c.text_embeds) and torch.equal(back.pooled, c.pooled)
    assert torch.equal(back.text_mask, c.text_mask)
    # ComfyUI's own Kandinsky 5 conditioning (no mask, every token real) is taken; another model's is refused by
    # its widths before sampling, naming the input and the files that fit
    native = text.from_conditioning([[torch.zeros(1, 9, 3584), {"pooled_output": torch.zeros(1, 768)}]], "positive")
    assert native.text_mask.all() and native.text_mask.shape == (1, 9)
    sdxl_style = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    c = text.from_conditioning(sdxl_style, "negative")
    from kandinsky_core.settings import text_width_problem

    problem = text_width_problem("t2v-lite-sft-5s", "negative", c.text_embeds.shape[-1], c.pooled.shape[-1])
    assert problem.input == "negative" and "2048 (Qwen) / 1280 (CLIP)" in problem.message
    with pytest.raises(InputError, match="negative.*Kandinsky 5 Text Encode"):
        text.from_conditioning([[torch.zeros(1, 77, 2048), {}]], "negative")
    with pytest.raises(InputError, match="template is auto but no model"):
        text.pick_template("auto", None)
    assert text.pick_template("image", None) == ("image", 512)


def test_prompt_expansion_node_shows_qwen_the_image_as_loaded_and_expand_off_passes_the_prompt(comfy, monkeypatch):
    """The bundled workflows feed Load Image's output to Prompt Expansion: the node hands Qwen that image at its own
    size (kandinsky_core quarters it for image_edit, as the official I2I pipeline does). expand off (the bundled
    workflows' switch) returns the prompt as written and runs nothing of Qwen."""
    calls = []

    class Encoders:
        qwen = clip = None

        def expand_prompt(self, prompt, kind, image=None, seed=None, max_new_tokens=256):
            calls.append((prompt, kind, None if image is None else tuple(image.shape), seed, max_new_tokens))
            return "a detailed " + prompt

    monkeypatch.setattr(text, "qwen_layers", lambda enc: [])
    monkeypatch.setattr(text, "activation_memory", lambda enc, n: 0)
    monkeypatch.setattr(comfy_glue, "loaded_or_swapped", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(comfy_glue, "cancellable", lambda *a: contextlib.nullcontext())
    te = types.SimpleNamespace(encoders=Encoders(), patcher=None)
    image = torch.rand(1, 90, 150, 3)
    out = text.PromptExpansion.execute(te, "a fox", "image_edit", 7, 64, image=image)
    assert out.result == ("a detailed a fox",) and out.ui == {"text": ["a detailed a fox"]}
    assert calls == [("a fox", "image_edit", (3, 90, 150), 7, 64)]
    calls.clear()
    off = text.PromptExpansion.execute(te, "a fox ", "image_edit", 7, 64, image=image, expand=False)
    assert off.result == ("a fox ",) and calls == []
    with pytest.raises(InputError, match="prompt is empty"):
        text.PromptExpansion.execute(te, "  ", "video", 7, 64, expand=False)


def test_image_layouts():
    pixels = torch.linspace(-1, 1, 2 * 3 * 5 * 4 * 6).reshape(2, 3, 5, 4, 6)
    image = vae_node.pixels_to_image(pixels)
    assert image.shape == (10, 4, 6, 3)
    torch.testing.assert_close(image[7, 2, 3], (pixels[1, :, 2, 2, 3] + 1) / 2)  # batch 1, frame 2
    u8 = torch.randint(0, 256, (1, 4, 6, 3), generator=torch.Generator().manual_seed(0))
    back = vae_node.image_to_pixels(u8.float() / 255, 0, 0)
    torch.testing.assert_close(back, u8.permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_fail_prefixes_the_node_and_keeps_the_class():
    with pytest.raises(WeightsError, match=r"^Load Kandinsky 5 VAE: bad file$"):
        with common.fail("Load Kandinsky 5 VAE"):
            raise WeightsError("bad file")
    with pytest.raises(ZeroDivisionError):
        with common.fail("x"):
            raise ZeroDivisionError


# ---------------------------------------------------------------------------------------------------------------------
# Nodes on fake ComfyUI modules and tiny files


def test_model_lists_and_missing_files(comfy):
    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    folder = comfy.root / "text_encoders" / "org" / "qwen"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (comfy.root / "text_encoders" / "notes.txt").write_text("not a model")
    assert files.list_models("diffusion_models") == [TINY_NAME]
    assert files.list_models("text_encoders", folders=True) == ["org/qwen/", "org/qwen/model.safetensors"]
    assert files.resolve("text_encoders", "org/qwen/", "qwen_name") == folder
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' is not in ComfyUI's vae folder"):
        files.resolve("vae", "gone.safetensors", "vae_name")


def test_load_dit_validation_refuses_other_files_and_wrong_variants(comfy):
    import tiny_flux_vae

    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    vae_file = tiny_flux_vae.write_tiny_flux_vae(comfy.root / "diffusion_models", "bfl")
    assert loaders.LoadDiT.validate_inputs(TINY_NAME, "auto") is True
    assert loaders.LoadDiT.validate_inputs(TINY_NAME, "t2v-lite-sft-5s") is True
    msg = loaders.LoadDiT.validate_inputs(vae_file.name, "auto")
    assert "not a Kandinsky 5 DiT" in msg and "image VAE" in msg
    msg = loaders.LoadDiT.validate_inputs(TINY_NAME, "t2v-pro-sft-5s-sd")
    assert "does not fit" in msg and "t2v-lite-sft-5s" in msg
    assert "not in models/diffusion_models" in loaders.LoadDiT.validate_inputs("nope.safetensors", "auto")
    assert loaders.vae_kind(vae_file) == "flux"


def run_sampler_node(model, **overrides):
    kw = dict(
        width=64, height=32, length=5, batch_size=1, seed=3, steps=3, guidance=-1.0, scheduler_scale=0.0,
    )  # fmt: skip
    kw.update(overrides)
    pos, neg = text.to_conditioning(conditioning(1), "video"), text.to_conditioning(conditioning(2), "video")
    return sampler_node.Sampler.execute(model, pos, neg, **kw)[0]["samples"]


def test_sampler_node_matches_kandinsky_core_and_reports_progress(comfy):
    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    (model,) = loaders.LoadDiT.execute(TINY_NAME, "auto", "fp32", "auto")
    assert model.model.variant.name == "t2v-lite-sft-5s" and isinstance(model.model, comfy_model.model_class())
    latent = run_sampler_node(model)

    v = model.model.variant
    noise = make_noise((1, 16, 2, 4, 8), 3)
    want = sample(
        model.model.diffusion_model, noise, conditioning(1), conditioning(2), steps=3, guidance=v.guidance,
        scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale,
    )  # fmt: skip
    assert latent.shape == (1, 16, 2, 4, 8)
    torch.testing.assert_close(latent, dit_to_latent(want, v.latent_scale), rtol=0, atol=0)
    # ComfyUI was asked to load the DiT with an activation estimate; one progress update per step, with a preview
    assert comfy.loads[-1][0] is model and comfy.loads[-1][1] > 0
    assert [p[:2] for p in comfy.progress] == [(1, 3), (2, 3), (3, 3)] and all(p[2] for p in comfy.progress)
    # the last preview is the final latent in ComfyUI's HunyuanVideo space (latent * scale_factor)
    torch.testing.assert_close(comfy.previews[-1], latent_to_dit(latent, 0.476986), rtol=1e-4, atol=1e-4)
    other = run_sampler_node(model, seed=4)
    assert (other - latent).abs().mean() > 0.1


def test_i2v_sampler_node_run_again_on_the_same_cached_inputs_gives_the_same_latent(comfy, monkeypatch):
    """ComfyUI hands a cached node's output objects (VAE Encode's LATENT dict, Text Encode's CONDITIONING) to the
    next run of the Sampler as they are: the Sampler must not change them, so that the same seed gives the same
    latent in every run of one server."""
    monkeypatch.setitem(variants.VARIANTS, "i2v-lite-5s", dataclasses.replace(variants.VARIANTS["i2v-lite-5s"],
                                                                              arch=TINY_T2V))  # fmt: skip
    name = "kandinsky5lite_i2v_5s.safetensors"
    make_tiny_dit_file(comfy.root / "diffusion_models" / name, TINY_T2V)
    (model,) = loaders.LoadDiT.execute(name, "i2v-lite-5s", "fp32", "auto")
    start = {"samples": make_noise((1, 16, 1, 4, 8), 5)}
    pos, neg = text.to_conditioning(conditioning(1), "video"), text.to_conditioning(conditioning(2), "video")
    kept = [t.clone() for t in (start["samples"], pos[0][0], pos[0][1]["pooled_output"], neg[0][0])]

    def run() -> torch.Tensor:
        kw = dict(width=64, height=32, length=5, batch_size=1, seed=3, steps=2, guidance=-1.0, scheduler_scale=0.0)
        return sampler_node.Sampler.execute(model, pos, neg, start_latent=start, **kw)[0]["samples"]

    first, second = run(), run()
    assert torch.equal(start["samples"], kept[0]), "the Sampler changed the cached start latent"
    now = (pos[0][0], pos[0][1]["pooled_output"], neg[0][0])
    assert all(map(torch.equal, now, kept[1:])), "the Sampler changed the cached conditioning"
    assert torch.equal(first, second), f"same seed, other latent: max |diff| {(first - second).abs().max():g}"


def test_sampler_node_stops_when_interrupted_and_checks_inputs(comfy):
    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    (model,) = loaders.LoadDiT.execute(TINY_NAME, "auto", "fp32", "auto")
    comfy.interrupt_at = 1
    with pytest.raises(Interrupted):
        run_sampler_node(model, steps=10)
    assert comfy.progress == []  # stopped inside the first step, between two DiT blocks (kandinsky_core.cancel)
    comfy.interrupt_at = None
    with pytest.raises(InputError, match=r"^Kandinsky 5 Sampler: length=6 frames must be 4k\+1"):
        run_sampler_node(model, length=6)
    start = {"samples": torch.zeros(1, 16, 1, 4, 8)}
    with pytest.raises(InputError, match="start_latent is given but t2v-lite-sft-5s is a T2V model"):
        run_sampler_node(model, start_latent=start)
    with pytest.raises(InputError) as e:  # every problem at once, each naming its input
        run_sampler_node(model, length=6, start_latent=start)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("Kandinsky 5 Sampler: length=6 frames") and lines[1].startswith("start_latent is given")
    assert [p.input for p in e.value.problems] == ["length", "start_image"] and len(lines) == 2
    assert sampler_node.Sampler.validate_inputs(64, 32, 5, -1.0, 0.0) is True
    assert "length=4" in sampler_node.Sampler.validate_inputs(64, 32, 4, -1.0, 0.0)


def test_vae_nodes_match_the_vae_and_return_comfy_layouts(comfy):
    import tiny_vae

    tiny_vae.write_diffusers_folder(comfy.root / "vae" / "HunyuanVideo" / "vae", seed=0)
    assert files.list_models("vae", folders=True)[0] == "HunyuanVideo/vae/"
    (vae,) = loaders.LoadVAE.execute("HunyuanVideo/vae/", "fp32")
    assert vae.kind == "hunyuan"
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 2, 4, 6, generator=g)
    (image,) = vae_node.VAEDecode.execute(vae, {"samples": latent}, "off", 256, 64, 16, 8)
    want = vae.vae.decode(latent, tiled=False).clamp(-1, 1)
    assert image.shape == (5, 32, 48, 3)
    torch.testing.assert_close(image, ((want + 1) / 2)[0].permute(1, 2, 3, 0))

    pictures = torch.rand(1, 40, 60, 3, generator=g)  # resized to cover 48x32 and centre-cropped
    encoded, image = vae_node.VAEEncode.execute(vae, pictures, 48, 32)
    assert encoded["samples"].shape == (1, 16, 1, 4, 6) and image.shape == (1, 32, 48, 3)
    assert vae_node.VAEEncode.validate_inputs(48, 0) != True  # noqa: E712


def test_dit_operations_use_comfy_manual_cast_with_our_rmsnorm_as_fallback(comfy, monkeypatch):
    from kandinsky_core import layers

    ops = types.ModuleType("comfy.ops")

    class manual_cast:  # an older comfy.ops without RMSNorm
        class Linear(torch.nn.Linear):
            comfy_cast_weights = True

        class LayerNorm(torch.nn.LayerNorm):
            comfy_cast_weights = True

    ops.manual_cast = manual_cast
    monkeypatch.setitem(sys.modules, "comfy.ops", ops)
    monkeypatch.setattr(sys.modules["comfy"], "ops", ops, raising=False)
    got = comfy_glue.dit_operations()
    assert issubclass(got.Linear, manual_cast.Linear) and got.Linear.comfy_cast_weights
    assert (got.LayerNorm, got.RMSNorm) == (manual_cast.LayerNorm, layers.RMSNorm)


def test_text_encoder_loader_uses_comfyui_tokenizers_only_for_single_files(comfy, monkeypatch):
    from kandinsky_core import text_encoders

    calls = []

    def fake_load(qwen, clip, **kw):
        calls.append((qwen, clip, kw["tokenizer_dir"]))
        return types.SimpleNamespace(qwen=torch.nn.Linear(1, 1), clip=torch.nn.Linear(1, 1))

    monkeypatch.setattr(text_encoders, "load_text_encoders", fake_load)
    te = comfy.root / "text_encoders"
    for folder in ("qwen", "clip"):
        (te / folder).mkdir()
        (te / folder / "config.json").write_text("{}")
        (te / folder / "model.safetensors").write_bytes(b"")
    (te / "clip_l.safetensors").write_bytes(b"")
    loaders.LoadTextEncoders.execute("qwen/", "clip/", "default")
    loaders.LoadTextEncoders.execute("qwen/", "clip_l.safetensors", "default")
    assert calls[0] == (te / "qwen", te / "clip", None)
    assert calls[1] == (te / "qwen", te / "clip_l.safetensors", str(comfy.root / "comfy"))
    assert comfy.loads == []  # loading a node's model only registers it; ComfyUI loads it when it is used


# ---------------------------------------------------------------------------------------------------------------------
# MagCache and MagCache Calibrate: MODEL -> MODEL options the Sampler honours


def tiny_model(comfy):
    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    return loaders.LoadDiT.execute(TINY_NAME, "auto", "fp32", "auto")[0]


def core_sample(model, steps, block_cache=None):
    """What the Sampler node must compute (run_sampler_node's defaults: seed 3, 64x32, 5 frames, CFG 5)."""
    v = model.model.variant
    return sample(
        model.model.diffusion_model, make_noise((1, 16, 2, 4, 8), 3), conditioning(1), conditioning(2), steps=steps,
        guidance=v.guidance, scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale, block_cache=block_cache,
    )  # fmt: skip


def test_magcache_node_gives_the_latent_of_sample_with_the_same_magcache(comfy):
    from kandinsky_core.magcache import OFFICIAL_MAG_RATIOS, MagCache, MagCacheParams
    from nodes.magcache import MagCacheNode

    model = tiny_model(comfy)
    (cached_model,) = MagCacheNode.execute(model, 0.5, 2, 0.0, "")
    assert cached_model.model is model.model and options_of(model).block_cache is None  # the input is unchanged
    assert options_of(cached_model).block_cache is not None  # the clone carries the option
    latent = run_sampler_node(cached_model, steps=8)

    cache = MagCache(MagCacheParams(OFFICIAL_MAG_RATIOS["t2v-lite-sft-5s"], threshold=0.5, K=2, retention=0.0))
    want = core_sample(model, 8, cache)
    torch.testing.assert_close(latent, dit_to_latent(want, model.model.variant.latent_scale), rtol=0, atol=0)
    assert cache.skipped  # the cache did skip, so the node's latent differs from the plain one
    plain = run_sampler_node(model, steps=8)
    assert not torch.equal(plain, latent)
    want = dit_to_latent(core_sample(model, 8), model.model.variant.latent_scale)
    torch.testing.assert_close(plain, want, rtol=0, atol=0)


def test_magcache_calibrate_node_writes_the_ratios_the_magcache_node_reads(comfy, monkeypatch, tmp_path):
    import json

    from kandinsky_core.magcache import MagCalibration
    from nodes.magcache import MagCacheCalibrate, MagCacheNode

    monkeypatch.setattr(sys.modules["folder_paths"], "get_output_directory", lambda: str(tmp_path / "out"), False)
    model = tiny_model(comfy)
    (calibrating,) = MagCacheCalibrate.execute(model, "k5cal")
    latent = run_sampler_node(calibrating, steps=4)
    torch.testing.assert_close(latent, run_sampler_node(model, steps=4), rtol=0, atol=0)  # nothing skipped

    path = tmp_path / "out" / "k5cal_t2v-lite-sft-5s_4steps.json"
    data = json.loads(path.read_text())
    calibration = MagCalibration()
    core_sample(model, 4, calibration)
    assert data["ratios"] == list(calibration.ratios()) and len(data["ratios"]) == 6
    for text_form in (path.read_text(), json.dumps(data["ratios"]), ", ".join(str(r) for r in data["ratios"])):
        (m,) = MagCacheNode.execute(model, 0.12, 2, 0.2, text_form)
        assert options_of(m).block_cache.params.ratios == tuple(data["ratios"])
    assert "letters, digits" in MagCacheCalibrate.validate_inputs("../x")


def test_magcache_node_errors_name_the_input_and_the_fix(comfy):
    from nodes.magcache import MagCacheNode

    distilled = variants.VARIANTS["t2v-lite-distilled16steps-5s"]
    model = comfy_model.make_patcher(tiny_model(comfy).model.diffusion_model, distilled, "auto", TINY_NAME)
    with pytest.raises(InputError, match=r"^Kandinsky 5 MagCache: ratios: t2v-lite-distilled16steps-5s has no "
                       r"official MagCache ratios.*Kandinsky 5 MagCache Calibrate"):  # fmt: skip
        MagCacheNode.execute(model, 0.12, 2, 0.2, "")
    with pytest.raises(InputError, match="is not a list of numbers"):
        MagCacheNode.execute(model, 0.12, 2, 0.2, "1.0, fast")
    with pytest.raises(InputError, match="retention=1.5 is not allowed"):
        MagCacheNode.execute(model, 0.12, 2, 1.5, "1.0, 1.0")


# ---------------------------------------------------------------------------------------------------------------------
# Compile: MODEL -> MODEL with a torch.compile setting, applied for the sampler's run only


def test_compile_node_setting_compiles_during_its_block_only_with_the_same_latent(comfy):
    from kandinsky_core.compile import compile_state
    from nodes.compile import Compile, CompileSetting

    model = tiny_model(comfy)
    (compiling,) = Compile.execute(model, "default", "eager")
    assert options_of(compiling).compile == CompileSetting("default", "eager") and compiling.model is model.model
    assert options_of(model).compile is None  # the input is unchanged
    torch._dynamo.reset()
    plain = core_sample(model, 1)
    with options_of(compiling).compile.applied(model.model.diffusion_model) as state:
        latent = core_sample(model, 1)
        assert state.compiled_calls > 0 and not state.failed
    torch._dynamo.reset()
    torch.testing.assert_close(latent, plain, rtol=0, atol=0)
    assert compile_state(model.model.diffusion_model) is None  # eager again for the other users of the loaded DiT
    with pytest.raises(InputError, match=r"^Kandinsky 5 Compile: mode 'fast' / backend 'inductor': allowed modes"):
        Compile.execute(model, "fast", "inductor")


def test_sampler_node_applies_the_compile_setting(comfy, monkeypatch):
    from nodes.compile import Compile, CompileSetting

    model = tiny_model(comfy)
    used = []
    real = CompileSetting.applied
    monkeypatch.setattr(CompileSetting, "applied", lambda self, dit: used.append(dit) or real(self, dit))
    (compiling,) = Compile.execute(model, "default", "eager")
    torch._dynamo.reset()
    latent = run_sampler_node(compiling, steps=2)
    torch._dynamo.reset()
    assert used == [model.model.diffusion_model]
    torch.testing.assert_close(latent, run_sampler_node(model, steps=2), rtol=0, atol=0)


def test_comfy_linear_applies_the_fp8_weight_scale_once():
    """In ComfyUI the DiT's Linear layers are comfy.ops classes, which cast the stored float8 weight but know
    nothing of our per-tensor scale: the pack's subclass applies it (on the input); our own Linear applies it
    itself and must not get it twice."""
    from kandinsky_core import layers
    from kandinsky_core.loading import to_scaled_fp8

    class CastLinear(torch.nn.Linear):  # what comfy.ops.manual_cast.Linear does with a float8 weight
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    g = torch.Generator().manual_seed(41)
    weight, bias = torch.randn(48, 32, generator=g) * 0.01, torch.randn(48, generator=g) * 0.01
    x = torch.randn(5, 32, generator=g)
    expected = x @ weight.T + bias
    for base in (CastLinear, layers.Linear):
        lin = comfy_glue.eager_weights(base)(32, 48)
        stored, scale = to_scaled_fp8(weight)
        lin.weight.data, lin.bias.data = stored, bias
        lin.register_buffer("weight_scale", scale, persistent=False)
        with torch.no_grad():
            out = lin(x)
        assert float((out - expected).norm() / expected.norm()) < 0.05, base  # float8's own rounding only


# ---------------------------------------------------------------------------------------------------------------------
# Load LoRA: ComfyUI weight patches on a clone; the math is kandinsky_core.lora's


def write_lora(path: Path, arch, modules: list[str], seed: int, trigger: str = "k5style", rank: int = 2) -> Path:
    """An official-trainer-format LoRA (PEFT keys, trigger in the metadata, config_lora.json beside it)."""
    from safetensors.torch import save_file

    from kandinsky_core.lora import _linear_shapes

    shapes = _linear_shapes(arch)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        out_f, in_f = shapes[m]
        sd[f"base_model.model.{m}.lora_A.default.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        sd[f"base_model.model.{m}.lora_B.default.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), {"trigger": trigger})
    (path.parent / "config_lora.json").write_text(f'{{"r": {rank}, "lora_alpha": {2 * rank}}}')
    return path


LORA_MODULES = [
    "visual_transformer_blocks.0.self_attention.to_query",
    "visual_transformer_blocks.1.feed_forward.in_layer",
    "text_transformer_blocks.0.self_attention.out_layer",
]


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    """What ComfyUI's patch_weight_to_device computes: each key's patches applied in order on a float32 copy."""
    sd = patcher.model.state_dict()
    out = {}
    for key, patches in patcher.patches.items():
        w = sd[key].float().clone()
        for strength, adapter, strength_model, offset, function in patches:
            w = adapter.calculate_weight(w, key, strength, strength_model, offset, function)
        out[key] = w
    return out


def test_lora_node_patches_a_clone_as_kandinsky_core_merges_stacks_and_shows_the_trigger(comfy):
    from kandinsky_core.lora import apply_lora, read_lora
    from nodes.lora import LoadLoRA

    model = tiny_model(comfy)
    a = write_lora(comfy.root / "loras" / "a" / "model.safetensors", TINY_T2V, LORA_MODULES, 1)
    b = write_lora(comfy.root / "loras" / "b" / "model.safetensors", TINY_T2V, LORA_MODULES[:2], 2, trigger="")
    assert LoadLoRA.validate_inputs("a/model.safetensors") is True
    assert "not in models/loras" in LoadLoRA.validate_inputs("nope.safetensors")
    res = LoadLoRA.execute(model, "a/model.safetensors", 0.7)
    one, trigger = res.result
    assert trigger == "k5style" and res.ui == {"text": ["k5style"]}
    assert model.patches == {} and one is not model and one.model is model.model
    two = LoadLoRA.execute(one, "b/model.safetensors", -1.5).result[0]
    assert [len(p) for p in one.patches.values()] == [1, 1, 1]
    assert sorted(len(p) for p in two.patches.values()) == [1, 2, 2]

    merged = make_tiny_dit_like(model)
    apply_lora(merged, read_lora(a), 0.7)
    apply_lora(merged, read_lora(b), -1.5)
    got = patched_weights(two)
    assert set(got) == {f"diffusion_model.{m}.weight" for m in LORA_MODULES}
    for m in LORA_MODULES:
        want = merged.get_submodule(m).weight
        torch.testing.assert_close(got[f"diffusion_model.{m}.weight"], want, rtol=1e-5, atol=1e-6)


def make_tiny_dit_like(model):
    from tiny import make_tiny_dit

    return make_tiny_dit(model.model.diffusion_model.arch)


def test_lora_node_fp8_weights_get_the_delta_divided_by_their_scale(comfy):
    from kandinsky_core.lora import apply_lora, read_lora
    from nodes.lora import LoadLoRA

    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    model = loaders.LoadDiT.execute(TINY_NAME, "auto", "fp8_e4m3fn", "auto")[0]
    path = write_lora(comfy.root / "loras" / "model.safetensors", TINY_T2V, LORA_MODULES[:1], 1)
    out = LoadLoRA.execute(model, "model.safetensors", 1.0).result[0]
    m = LORA_MODULES[0]
    layer = model.model.diffusion_model.get_submodule(m)
    assert layer.weight.dtype == torch.float8_e4m3fn
    got = patched_weights(out)[f"diffusion_model.{m}.weight"] * layer.weight_scale
    want = make_tiny_dit_like(model)
    apply_lora(want, read_lora(path), 1.0)
    w = want.get_submodule(m).weight
    assert (got - w).abs().max() < 0.07 * w.abs().max()  # the stored float8 weight's rounding only


def test_lora_node_refuses_a_lora_for_another_size_or_model(comfy):
    from safetensors.torch import save_file

    from nodes.lora import LoadLoRA

    model = tiny_model(comfy)
    m = "visual_transformer_blocks.0.self_attention.to_query"
    save_file({f"base_model.model.{m}.lora_A.default.weight": torch.zeros(2, 4096),
               f"base_model.model.{m}.lora_B.default.weight": torch.zeros(4096, 2)},
              str(comfy.root / "loras" / "pro.safetensors"))  # fmt: skip
    with pytest.raises(WeightsError, match=r"^Load Kandinsky 5 LoRA: lora_name: .*model_dim 4096 \(Kandinsky 5 Pro\)"):
        LoadLoRA.execute(model, "pro.safetensors", 1.0)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)},
              str(comfy.root / "loras" / "flux.safetensors"))  # fmt: skip
    with pytest.raises(WeightsError, match="not a LoRA for the Kandinsky 5 DiT"):
        LoadLoRA.execute(model, "flux.safetensors", 1.0)
    assert model.patches == {}


def test_lora_node_keeps_every_option_and_options_keep_the_lora(comfy):
    from nodes.compile import Compile
    from nodes.lora import LoadLoRA
    from nodes.magcache import MagCacheNode

    model = tiny_model(comfy)
    write_lora(comfy.root / "loras" / "model.safetensors", TINY_T2V, LORA_MODULES, 1)
    (cached,) = MagCacheNode.execute(model, 0.5, 2, 0.0, "")
    (compiled,) = Compile.execute(cached, "default", "eager")
    out = LoadLoRA.execute(compiled, "model.safetensors", 1.0).result[0]
    assert options_of(out) == options_of(compiled) and out.patches
    (again,) = MagCacheNode.execute(out, 0.12, 2, 0.2, "")
    assert again.patches == out.patches and options_of(again).compile == options_of(out).compile
    assert options_of(model) == options_of(model).__class__() and model.patches == {}


# ---------------------------------------------------------------------------------------------------------------------
# Kandinsky 5 NABLA: a model option the Sampler takes NABLA from


def nabla_node(model, mode: str, **tuning):
    """Kandinsky 5 NABLA as ComfyUI calls it: the DynamicCombo's dict where ComfyUI has one, else plain inputs."""
    from nodes import nabla

    if nabla.DYNAMIC:
        return nabla.Nabla.execute(model, {"mode": mode, **tuning})[0]
    return nabla.Nabla.execute(model, mode, **tuning)[0]


def test_nabla_node_sets_the_option_and_the_sampler_takes_nabla_from_it(comfy):
    from kandinsky_core.nabla import NablaParams
    from kandinsky_core.settings import NablaChoice

    model = tiny_model(comfy)  # t2v-lite-sft-5s: dense by default (auto)
    sparse = nabla_node(model, "on", P=0.1, wT=1, wH=1, wW=1)
    assert options_of(sparse).nabla == NablaChoice("on", 0.1, 1, 1, 1)
    assert options_of(model).nabla == NablaChoice() and sparse.model is model.model  # input unchanged
    assert options_of(nabla_node(model, "off", P=0.5)).nabla == NablaChoice("off")  # P only counts when on
    with pytest.raises(InputError, match=r"(?s)^Kandinsky 5 Sampler: width=64 must be a multiple of 128 px.*"
                       r"or set mode to off in Kandinsky 5 NABLA.*height=32 must be a multiple of 128"):  # fmt: skip
        run_sampler_node(sparse)
    size = dict(width=256, height=256)
    latent = run_sampler_node(sparse, **size)
    v = model.model.variant
    want = sample(
        model.model.diffusion_model, make_noise((1, 16, 2, 32, 32), 3), conditioning(1), conditioning(2), steps=3,
        guidance=v.guidance, scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale,
        nabla=NablaParams(0.1, 1, 1, 1),
    )  # fmt: skip
    torch.testing.assert_close(latent, dit_to_latent(want, v.latent_scale), rtol=0, atol=0)
    dense = run_sampler_node(model, **size)
    assert (dense - latent).abs().max() > 1e-3  # NABLA really was on: the comparison can fail
    torch.testing.assert_close(run_sampler_node(nabla_node(model, "auto"), **size), dense, rtol=0, atol=0)
    with pytest.raises(InputError, match="^Kandinsky 5 NABLA: NABLA window wT=4 is not allowed"):
        nabla_node(model, "on", wT=4)


def test_nabla_node_shows_p_and_windows_only_when_on_where_comfyui_can(comfy):
    from nodes import nabla

    inputs = nabla.Nabla.define_schema().inputs
    if nabla.DYNAMIC:  # v0.33.0: a DynamicCombo whose "on" option holds P and the windows
        (model, mode) = inputs
        options = {o.key: [i.id for i in o.inputs] for o in mode.options}
        assert options == {"auto": [], "on": ["P", "wT", "wH", "wW"], "off": []}
        assert all(i.tooltip for o in mode.options for i in o.inputs)
    else:  # v0.3.64: plain inputs, optional
        assert [i.id for i in inputs] == ["model", "mode", "P", "wT", "wH", "wW"]
        assert all(i.optional for i in inputs[2:])


# ---------------------------------------------------------------------------------------------------------------------
# The DiT as a ComfyUI MODEL (nodes/comfy_model.py; the real BaseModel, KSampler and LoRA loaders: tests/integration)


def test_a_model_that_is_not_ours_is_refused_with_what_it_is_and_what_to_load(comfy):
    from nodes.lora import LoadLoRA

    native = type("Kandinsky5", (torch.nn.Module,), {"model_config": None})()
    others = {
        "ComfyUI's own Kandinsky 5 model": types.SimpleNamespace(model=native, patches={}),
        "a SDXL model (ComfyUI model class SDXL)": types.SimpleNamespace(
            model=type("SDXL", (torch.nn.Module,), {"model_config": None})(), patches={}
        ),
    }
    for what, other in others.items():
        with pytest.raises(InputError, match=r"^Kandinsky 5 Sampler: model is " + re.escape(what)):
            run_sampler_node(other)
        with pytest.raises(InputError, match="Load Kandinsky 5 DiT and connect its MODEL output"):
            LoadLoRA.execute(other, "x.safetensors", 1.0)


def test_a_comfyui_weight_patch_on_a_scaled_fp8_weight_is_refused(comfy):
    """ComfyUI's LoRA loaders add their delta to the stored float8 weight, which is the weight divided by its
    weight_scale: the Sampler refuses such a patch instead of applying it at the wrong strength. Our LoRA node's
    patches (which divide by the scale) pass."""
    from nodes.lora import LoadLoRA

    make_tiny_dit_file(comfy.root / "diffusion_models" / TINY_NAME, TINY_T2V)
    model = loaders.LoadDiT.execute(TINY_NAME, "auto", "fp8_e4m3fn", "auto")[0]
    write_lora(comfy.root / "loras" / "model.safetensors", TINY_T2V, LORA_MODULES[:1], 1)
    ours = LoadLoRA.execute(model, "model.safetensors", 1.0).result[0]
    assert comfy_model.scaled_weight_patch_problem(ours) is None
    key = f"diffusion_model.{LORA_MODULES[0]}.weight"
    theirs = model.clone()
    theirs.patches = {key: [(1.0, ("lora", (torch.zeros(1),)), 1.0, None, None)]}  # what comfy.lora makes
    with pytest.raises(InputError, match=rf"^Kandinsky 5 Sampler: model: a LoRA .* targets {key}, a float8 weight"):
        run_sampler_node(theirs, steps=1)
    fp32 = tiny_model(comfy).clone()
    fp32.patches = dict(theirs.patches)
    assert comfy_model.scaled_weight_patch_problem(fp32) is None  # weights without a scale: ComfyUI's patch is right
