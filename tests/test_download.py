"""download.py: where each file of a variant goes, what counts as present, fast offline failure, no overwriting."""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kandinsky_core import download
from kandinsky_core.errors import MissingFilesError, WeightsError
from kandinsky_core.variants import get_variant

ROOT = Path(__file__).resolve().parents[1]


def by_role(plan):
    return {p.role: p for p in plan}


def test_plan_video_variant_uses_comfyui_single_files(tmp_path):
    """The default is what the bundled workflows load: ComfyUI's single files, plus the tokenizers outside ComfyUI."""
    plan = by_role(download.plan_downloads(get_variant("t2v-lite-sft-5s"), tmp_path))
    assert set(plan) == {"dit", "qwen", "clip", "vae", "qwen_tokenizer", "clip_tokenizer"}
    assert not any(p.present for p in plan.values())
    assert plan["dit"].repo == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s"
    assert plan["dit"].filename == "model/kandinsky5lite_t2v_sft_5s.safetensors"
    assert plan["dit"].dest == tmp_path / "diffusion_models" / "kandinsky5lite_t2v_sft_5s.safetensors"
    assert plan["qwen"].repo == "Comfy-Org/HunyuanVideo_1.5_repackaged"
    assert plan["qwen"].filename == "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"
    assert plan["qwen"].dest == tmp_path / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    assert plan["clip"].dest == tmp_path / "text_encoders" / "clip_l.safetensors"
    assert plan["vae"].repo == "Comfy-Org/HunyuanVideo_repackaged"
    assert plan["vae"].dest == tmp_path / "vae" / "hunyuan_video_vae_bf16.safetensors"
    assert not plan["vae"].gated
    # tokenizers under the folder names ComfyUI bundles them with, where the loaders look for them
    assert plan["qwen_tokenizer"].repo == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert plan["qwen_tokenizer"].dest == tmp_path / "text_encoders" / "qwen25_tokenizer"
    assert "model-00001-of-00005.safetensors" not in plan["qwen_tokenizer"].allow_patterns
    assert plan["clip_tokenizer"].dest == tmp_path / "text_encoders" / "sd1_tokenizer"
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


def test_workflows_name_the_files_download_places():
    """One table: the bundled workflows' properties.models are the files `download` fetches, from the same URLs."""
    from workflow_script import load_make_workflows

    mw = load_make_workflows()
    for v in (get_variant("t2v-lite-sft-5s"), get_variant("t2i-lite")):
        plan = by_role(download.plan_downloads(v, Path("/nonexistent/models")))
        entries = [e for es in mw.model_entries(v).values() for e in es]
        for role in ("dit", "qwen", "clip", "vae"):
            p = plan[role]
            assert {"name": p.dest.name, "directory": p.dest.parent.name,
                    "url": f"https://huggingface.co/{p.repo}/resolve/main/{p.filename}"} in entries  # fmt: skip


def test_plan_with_folders_takes_the_hugging_face_folders(tmp_path):
    plan = by_role(download.plan_downloads(get_variant("t2v-lite-sft-5s"), tmp_path, folders=True))
    assert set(plan) == {"dit", "qwen", "clip", "vae"}  # folders bring their own tokenizers
    assert plan["qwen"].repo == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert plan["qwen"].dest == tmp_path / "text_encoders" / "Qwen2.5-VL-7B-Instruct"
    assert plan["clip"].repo == "openai/clip-vit-large-patch14"
    assert plan["clip"].dest == tmp_path / "text_encoders" / "clip-vit-large-patch14"
    assert plan["vae"].repo == "hunyuanvideo-community/HunyuanVideo"
    assert plan["vae"].dest == tmp_path / "vae" / "HunyuanVideo"
    assert set(plan["vae"].allow_patterns) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert not plan["vae"].gated


def test_plan_image_variant_takes_the_non_gated_flux_vae(tmp_path):
    plan = by_role(download.plan_downloads(get_variant("t2i-lite"), tmp_path))
    assert plan["dit"].repo == "kandinskylab/Kandinsky-5.0-T2I-Lite"
    assert plan["vae"].dest == tmp_path / "vae" / "ae.safetensors"
    assert not plan["vae"].gated
    folders = by_role(download.plan_downloads(get_variant("t2i-lite"), tmp_path, folders=True))
    assert folders["vae"].repo == "black-forest-labs/FLUX.1-dev"
    assert folders["vae"].dest == tmp_path / "vae" / "FLUX.1-dev"
    assert folders["vae"].gated


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_present_comfyui_single_files_are_used(tmp_path):
    dit = touch(tmp_path / "unet" / "kandinsky" / "kandinsky5lite_i2v_5s.safetensors")
    qwen = touch(tmp_path / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    clip = touch(tmp_path / "clip" / "clip_l.safetensors")
    vae = touch(tmp_path / "vae" / "hunyuan_video_vae_bf16.safetensors")
    plan = by_role(download.plan_downloads(get_variant("i2v-lite-5s"), tmp_path))
    assert all(plan[role].present for role in ("dit", "qwen", "clip", "vae"))
    paths = download.model_paths(list(plan.values()))
    assert (paths.dit, paths.qwen, paths.clip, paths.vae) == (dit, qwen, clip, vae)
    # single files need tokenizers: not in a ComfyUI install, so they are planned into text_encoders/
    assert not plan["qwen_tokenizer"].present and not plan["clip_tokenizer"].present
    for role in ("qwen_tokenizer", "clip_tokenizer"):
        for name in plan[role].allow_patterns:
            touch(plan[role].dest / name)
    plan = download.plan_downloads(get_variant("i2v-lite-5s"), tmp_path)
    assert all(p.present for p in plan)
    assert download.model_paths(plan, tmp_path).tokenizer_dir == tmp_path / "text_encoders"


def test_inside_comfyui_its_bundled_tokenizers_serve(tmp_path):
    (tmp_path / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    models = tmp_path / "models"
    plan = download.plan_downloads(get_variant("t2i-lite"), models)
    assert [p.role for p in plan] == ["dit", "qwen", "clip", "vae"]
    assert download.model_paths(plan, models).tokenizer_dir == tmp_path.resolve()


def test_folders_count_only_when_complete(tmp_path):
    qwen = tmp_path / "text_encoders" / "Qwen2.5-VL-7B-Instruct"
    touch(qwen / "config.json", b"{}")
    touch(
        qwen / "model.safetensors.index.json",
        b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}',
    )
    touch(qwen / "model-00001-of-00002.safetensors")
    touch(tmp_path / "vae" / "FLUX.1-dev" / "vae" / "config.json", b"{}")  # weights missing
    plan = by_role(download.plan_downloads(get_variant("t2i-lite"), tmp_path))
    assert not plan["qwen"].present and not plan["vae"].present
    touch(qwen / "model-00002-of-00002.safetensors")
    touch(tmp_path / "vae" / "FLUX.1-dev" / "vae" / "diffusion_pytorch_model.safetensors")
    plan = by_role(download.plan_downloads(get_variant("t2i-lite"), tmp_path))
    assert plan["qwen"].present and plan["qwen"].path == qwen
    assert plan["vae"].present and plan["vae"].path == tmp_path / "vae" / "FLUX.1-dev" / "vae"


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_offline_env_fails_at_once_listing_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    existing = touch(tmp_path / "diffusion_models" / "kandinsky5lite_t2i.safetensors", b"mine")
    before = snapshot(tmp_path)
    start = time.perf_counter()
    with pytest.raises(MissingFilesError) as err:
        download.ensure_files(get_variant("t2i-lite"), tmp_path)
    assert time.perf_counter() - start < 3.0  # "within seconds": no network wait at all
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "5 file(s)" in msg
    for repo, dest in (
        ("Comfy-Org/HunyuanVideo_1.5_repackaged", "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
        ("comfyanonymous/flux_text_encoders", "text_encoders/clip_l.safetensors"),
        ("Comfy-Org/z_image_turbo", "vae/ae.safetensors"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "text_encoders/qwen25_tokenizer"),
        ("openai/clip-vit-large-patch14", "text_encoders/sd1_tokenizer"),
    ):
        assert repo in msg and str(tmp_path / dest) in msg
    assert "python -m kandinsky_core download --variant t2i-lite" in msg
    assert str(existing) not in msg  # present files are not listed
    assert snapshot(tmp_path) == before  # nothing written, nothing touched


def test_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    start = time.perf_counter()
    with pytest.raises(MissingFilesError) as err:
        download.ensure_files(get_variant("t2v-lite-sft-5s"), tmp_path)
    assert time.perf_counter() - start < download.CONNECT_TIMEOUT_S + 1
    msg = str(err.value)
    assert "unreachable" in msg and "127.0.0.1:9" in msg and "6 file(s)" in msg
    assert "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s/model/kandinsky5lite_t2v_sft_5s.safetensors" in msg
    assert list(tmp_path.iterdir()) == []


def test_cli_download_offline_subprocess(tmp_path):
    """The real command, in a fresh interpreter, with no network at all: exit 2, every file named, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "kandinsky_core", "download", "--variant", "i2v-lite-5s", "--models-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.perf_counter() - start < 60  # the interpreter and torch import dominate; no network wait
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for repo in (
        "Kandinsky-5.0-I2V-Lite-5s",
        "Comfy-Org/HunyuanVideo_1.5_repackaged",
        "comfyanonymous/flux_text_encoders",
    ):
        assert repo in r.stderr
    assert "Comfy-Org/HunyuanVideo_repackaged" in r.stderr


class FakeHub:
    """Stands in for huggingface_hub: serves made-up files into local_dir like hf_hub_download does."""

    def __init__(self, files: dict[str, list[str]], gated: set[str] = frozenset()):
        self.files, self.gated, self.calls = files, gated, []

    def hf_hub_download(self, repo_id, filename, *, local_dir, endpoint=None, **kw):
        if repo_id in self.gated:
            from huggingface_hub.errors import GatedRepoError

            response = SimpleNamespace(headers={}, request=None, status_code=401)
            raise GatedRepoError(f"401 Client Error: access to {repo_id} is restricted", response=response)
        self.calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{repo_id}/{filename}".encode())
        return str(path)

    def api(self, endpoint=None):
        return SimpleNamespace(list_repo_files=lambda repo: self.files[repo])


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub(
        {
            "Qwen/Qwen2.5-VL-7B-Instruct": [
                "config.json",
                "model-1.safetensors",
                "README.md",
                "merges.txt",
                "vocab.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ],
            "openai/clip-vit-large-patch14": [
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "flax.msgpack",
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ],
            "hunyuanvideo-community/HunyuanVideo": [
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "transformer/diffusion_pytorch_model.safetensors",
            ],
            "black-forest-labs/FLUX.1-dev": ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
        },
        gated={"black-forest-labs/FLUX.1-dev"},
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "_check_connection", lambda repo, endpoint: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    return hub


def test_download_places_single_files_and_tokenizers(tmp_path, fake_hub):
    plan = download.ensure_files(get_variant("t2i-lite"), tmp_path, log=lambda m: None)
    assert all(p.present for p in plan)
    for repo, name, dest in (
        ("Comfy-Org/HunyuanVideo_1.5_repackaged", "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
         "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
        ("comfyanonymous/flux_text_encoders", "clip_l.safetensors", "text_encoders/clip_l.safetensors"),
        ("Comfy-Org/z_image_turbo", "split_files/vae/ae.safetensors", "vae/ae.safetensors"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "tokenizer.json", "text_encoders/qwen25_tokenizer/tokenizer.json"),
        ("openai/clip-vit-large-patch14", "vocab.json", "text_encoders/sd1_tokenizer/vocab.json"),
    ):  # fmt: skip
        assert (tmp_path / dest).read_bytes() == f"{repo}/{name}".encode()
    assert ("Qwen/Qwen2.5-VL-7B-Instruct", "model-1.safetensors") not in fake_hub.calls  # tokenizer files only
    assert not any(repo == "black-forest-labs/FLUX.1-dev" for repo, _ in fake_hub.calls)  # gated: not needed
    paths = download.model_paths(plan, tmp_path)
    assert paths.tokenizer_dir == tmp_path / "text_encoders" and paths.vae == tmp_path / "vae" / "ae.safetensors"
    assert not (tmp_path / download.STAGING_DIR).exists()


def test_download_places_files_and_never_overwrites(tmp_path, fake_hub):
    mine = touch(tmp_path / "text_encoders" / "Qwen2.5-VL-7B-Instruct" / "config.json", b"my edited config")
    plan = download.ensure_files(get_variant("t2v-lite-sft-5s"), tmp_path, folders=True, log=lambda m: None)
    assert all(p.present for p in plan)
    assert mine.read_bytes() == b"my edited config"
    assert ("Qwen/Qwen2.5-VL-7B-Instruct", "config.json") not in fake_hub.calls
    assert ("openai/clip-vit-large-patch14", "pytorch_model.bin") not in fake_hub.calls  # only allowed patterns
    assert not any(f.startswith("transformer/") for _, f in fake_hub.calls)
    dit = tmp_path / "diffusion_models" / "kandinsky5lite_t2v_sft_5s.safetensors"
    assert dit.read_bytes() == b"kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s/model/kandinsky5lite_t2v_sft_5s.safetensors"
    assert (tmp_path / "text_encoders" / "clip-vit-large-patch14" / "model.safetensors").is_file()
    assert (tmp_path / "vae" / "HunyuanVideo" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    paths = download.model_paths(plan)
    assert paths.vae == tmp_path / "vae" / "HunyuanVideo" / "vae"
    assert not (tmp_path / download.STAGING_DIR).exists()  # staging cleaned up once everything is in place
    # a second run finds everything and fetches nothing
    n = len(fake_hub.calls)
    download.ensure_files(get_variant("t2v-lite-sft-5s"), tmp_path, folders=True, log=lambda m: None)
    assert len(fake_hub.calls) == n


def test_gated_flux_vae_explains_token_and_licence(tmp_path, fake_hub):
    with pytest.raises(WeightsError) as err:
        download.ensure_files(get_variant("t2i-lite"), tmp_path, folders=True, log=lambda m: None)
    msg = str(err.value)
    assert "--folders" in msg  # the way around the gate
    assert "gated" in msg and "HF_TOKEN" in msg and "login" in msg
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in msg
    assert not isinstance(err.value, MissingFilesError)


def test_no_download_flag_lists_missing(tmp_path, fake_hub):
    with pytest.raises(MissingFilesError, match="not allowed"):
        download.ensure_files(get_variant("t2i-lite"), tmp_path, allow_download=False)
    assert fake_hub.calls == []


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_MODELS_DIR", str(tmp_path))
    assert download.default_models_dir() == tmp_path
    monkeypatch.delenv("COMFYUI_MODELS_DIR")
    assert download.default_models_dir() in (Path("models"), ROOT.parent.parent / "models")


def test_connection_drop_mid_download_is_a_clear_error(tmp_path, fake_hub, monkeypatch):
    real = fake_hub.hf_hub_download

    def flaky(repo_id, filename, **kw):
        if filename == "model.safetensors":
            raise ConnectionResetError("connection reset by peer")
        return real(repo_id, filename, **kw)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", flaky)
    with pytest.raises(WeightsError, match="resumes") as err:
        download.ensure_files("t2v-lite-sft-5s", tmp_path, folders=True, log=lambda m: None)
    assert "openai/clip-vit-large-patch14" in str(err.value)
    clip = tmp_path / "text_encoders" / "clip-vit-large-patch14"
    assert not (clip / "model.safetensors").exists()
    assert not download.plan_downloads(get_variant("t2v-lite-sft-5s"), tmp_path)[2].present


def test_the_planned_tokenizer_folders_are_where_the_loaders_look(tmp_path):
    """The tokenizer files `download` places (real ones: those of ComfyUI's bundled copies, which lack Qwen's
    tokenizer.json) load through the CLI's tokenizer_dir, so the single-file text encoders work outside ComfyUI."""
    from prerequisites import missing

    from kandinsky_core.text_encoders import load_clip_tokenizer, load_qwen_tokenizer

    root = Path(os.environ.get("COMFYUI_DIR", "/nonexistent"))
    bundled = {
        "qwen_tokenizer": root / "comfy/text_encoders/qwen25_tokenizer",
        "clip_tokenizer": root / "comfy/sd1_tokenizer",
    }
    if not all((d / "vocab.json").is_file() for d in bundled.values()):
        missing("ComfyUI's bundled tokenizers (COMFYUI_DIR/comfy/...; `make test` sets it)")
    models = tmp_path / "models"
    touch(models / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    touch(models / "text_encoders" / "clip_l.safetensors")
    plan = by_role(download.plan_downloads(get_variant("t2i-lite"), models))
    for role, source in bundled.items():
        for name in plan[role].allow_patterns:
            if (source / name).is_file():
                touch(plan[role].dest / name, (source / name).read_bytes())
    plan = download.plan_downloads(get_variant("t2i-lite"), models)
    tokenizers = download.model_paths(plan, models).tokenizer_dir
    assert load_qwen_tokenizer(tokenizers)("<|im_start|>")["input_ids"] == [151644]
    assert load_clip_tokenizer(tokenizers)("a cat")["input_ids"][0] == 49406
