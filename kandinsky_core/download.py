"""Finding a variant's files in ComfyUI's model folders, and fetching the missing ones from Hugging Face.

Layout (ComfyUI folder names, relative to the models folder). By default the files ComfyUI's own Kandinsky 5
templates use, which the bundled workflows load too (`SINGLE_FILES`):
    diffusion_models/<DiT file>                         the variant's kandinskylab repository
    text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors Comfy-Org's repackaged Qwen2.5-VL-7B (scaled fp8)
    text_encoders/clip_l.safetensors                    CLIP ViT-L/14
    vae/hunyuan_video_vae_bf16.safetensors              the HunyuanVideo VAE (video variants)
    vae/ae.safetensors                                  the FLUX VAE (image variants; a non-gated copy)
    text_encoders/qwen25_tokenizer/, sd1_tokenizer/     the tokenizers, only outside ComfyUI (which bundles them)
With `folders=True`, the Hugging Face folders instead (`HF_FOLDERS`): Qwen/Qwen2.5-VL-7B-Instruct,
openai/clip-vit-large-patch14 and the VAE's diffusers vae/ (FLUX.1-dev's is gated). Either layout, and any ComfyUI
single file of the same model already there, counts as present.

Existing files are never overwritten or deleted. Every file is fetched into a staging folder
(`.kandinsky5-download/` in the models folder, where huggingface_hub keeps its resumable `.incomplete` files) and
renamed into place only when complete, and only if nothing is there yet.
"""

import contextlib
import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingFilesError, WeightsError

QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
CLIP_REPO = "openai/clip-vit-large-patch14"
HUNYUAN_VAE_REPO = "hunyuanvideo-community/HunyuanVideo"
FLUX_VAE_REPO = "black-forest-labs/FLUX.1-dev"

QWEN_DIR = "Qwen2.5-VL-7B-Instruct"
CLIP_DIR = "clip-vit-large-patch14"
HUNYUAN_VAE_DIR = "HunyuanVideo"
FLUX_VAE_DIR = "FLUX.1-dev"
VAE_FILES = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")

# ComfyUI reads text encoders from text_encoders/ and (older installs) clip/, DiTs from diffusion_models/ and unet/.
FOLDERS = {
    "dit": ("diffusion_models", "unet"),
    "qwen": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
    "vae": ("vae",),
}
# Single files other packs (ComfyUI's repackaged models) already put there, usable instead of a download.
COMFY_SINGLE_FILES = {
    "qwen": ("qwen_2.5_vl_7b*.safetensors",),
    "clip": ("clip_l.safetensors", "clip_l*.safetensors"),
    "hunyuan": ("hunyuan_video_vae_bf16.safetensors", "hunyuan_video_vae*.safetensors"),
    "flux": ("ae.safetensors", "flux_vae*.safetensors"),
}
STAGING_DIR = ".kandinsky5-download"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Source:
    """Where one file or folder comes from (`path` in `repo`; "*" = the repository's files matching
    `allow_patterns`) and where it goes (`folder`/`name` under the models folder)."""

    repo: str
    path: str
    folder: str
    name: str
    allow_patterns: tuple[str, ...] = ()
    gated: bool = False

    @property
    def url(self) -> str:
        """The direct download link (what ComfyUI's missing-models panel fetches)."""
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.path}"


# ComfyUI's repackaged single files, the ones its own Kandinsky 5 templates load; the bundled workflows name them.
SINGLE_FILES = {
    "qwen": Source("Comfy-Org/HunyuanVideo_1.5_repackaged",
                   "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders",
                   "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "clip": Source("comfyanonymous/flux_text_encoders", "clip_l.safetensors", "text_encoders", "clip_l.safetensors"),
    "hunyuan": Source("Comfy-Org/HunyuanVideo_repackaged", "split_files/vae/hunyuan_video_vae_bf16.safetensors", "vae",
                      "hunyuan_video_vae_bf16.safetensors"),
    "flux": Source("Comfy-Org/z_image_turbo", "split_files/vae/ae.safetensors", "vae", "ae.safetensors"),
}  # fmt: skip
# The Hugging Face folders (`download --folders`): they bring their own tokenizers.
HF_FOLDERS = {
    "qwen": Source(QWEN_REPO, "*", "text_encoders", QWEN_DIR, ("*.json", "*.safetensors", "*.txt", "*.jinja")),
    "clip": Source(CLIP_REPO, "*", "text_encoders", CLIP_DIR, ("*.json", "model.safetensors", "*.txt")),
    "hunyuan": Source(HUNYUAN_VAE_REPO, "*", "vae", HUNYUAN_VAE_DIR, VAE_FILES),
    "flux": Source(FLUX_VAE_REPO, "*", "vae", FLUX_VAE_DIR, VAE_FILES, gated=True),
}
# Single files carry no tokenizer. Inside ComfyUI its own bundled copies serve (comfy/text_encoders/qwen25_tokenizer,
# comfy/sd1_tokenizer); elsewhere these go into text_encoders/ under the same folder names.
TOKENIZERS = {
    "qwen_tokenizer": Source(QWEN_REPO, "*", "text_encoders", "qwen25_tokenizer",
                             ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")),
    "clip_tokenizer": Source(CLIP_REPO, "*", "text_encoders", "sd1_tokenizer",
                             ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")),
}  # fmt: skip


@dataclass(frozen=True)
class PlannedFile:
    """One thing a variant needs. `filename` is a file in `repo`, or "*" for a whole-folder snapshot restricted to
    `allow_patterns`. `dest` is where it lives under the models folder; `present` says it is already there (at `dest`
    or as an equivalent file found in `found`)."""

    role: str  # "dit" | "qwen" | "clip" | "vae"
    repo: str
    filename: str
    dest: Path
    present: bool
    found: Path | None = None
    allow_patterns: tuple[str, ...] = ()
    gated: bool = False

    @property
    def path(self) -> Path:
        return self.found if self.found is not None else self.dest

    def describe(self) -> str:
        what = (
            f"{self.repo} ({', '.join(self.allow_patterns)})"
            if self.filename == "*"
            else f"{self.repo}/{self.filename}"
        )
        return f"{self.role}: {self.dest}  <-  {what}"


@dataclass(frozen=True)
class ModelPaths:
    """Files for one run: DiT file, Qwen2.5-VL folder or file, CLIP-L folder or file, VAE folder or file.

    `tokenizer_dir`: where the tokenizers are when the text encoders are ComfyUI single files (ComfyUI's root,
    which holds comfy/text_encoders/qwen25_tokenizer and comfy/sd1_tokenizer); None: next to the weights."""

    dit: Path
    qwen: Path
    clip: Path
    vae: Path
    tokenizer_dir: Path | None = None


def default_models_dir() -> Path:
    """COMFYUI_MODELS_DIR, else ComfyUI's models folder when this pack sits in ComfyUI/custom_nodes, else ./models."""
    env = os.environ.get("COMFYUI_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    pack = Path(__file__).resolve().parent.parent
    if pack.parent.name == "custom_nodes" and (pack.parent.parent / "models").is_dir():
        return pack.parent.parent / "models"
    return Path("models")


def _find(models_dir: Path, folders: tuple[str, ...], patterns: tuple[str, ...]) -> Path | None:
    for folder in folders:
        root = models_dir / folder
        if not root.is_dir():
            continue
        for pattern in patterns:
            hits = sorted(p for p in root.rglob(pattern) if p.is_file() and STAGING_DIR not in p.parts)
            if hits:
                return hits[0]
    return None


def _intact(path: Path | None) -> Path | None:
    """`path`, unless it is a safetensors file cut short (an interrupted download: its header announces more data
    than the file holds), which is not "present" and is fetched again; None then. Other faults are the loaders'."""
    if path is None or path.is_dir():
        return path
    from .errors import TruncatedFileError, WeightsError
    from .loading import read_safetensors_header

    try:
        read_safetensors_header(path)
    except TruncatedFileError:
        return None
    except WeightsError:
        pass
    return path


def _is_complete_hf_folder(folder: Path) -> bool:
    """A transformers folder with its config and every weight shard the index names (a half-fetched one is not)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def _find_folder(models_dir: Path, folders: tuple[str, ...], name: str) -> Path | None:
    for folder in folders:
        candidate = models_dir / folder / name
        if candidate.is_dir() and _is_complete_hf_folder(candidate):
            return candidate
    return None


def _vae_kind(variant) -> str:
    kind = str(getattr(variant, "vae", "")).lower()
    if "flux" in kind:
        return "flux"
    if "hunyuan" in kind:
        return "hunyuan"
    task = str(getattr(variant, "task", "")).lower()
    return "flux" if task in ("t2i", "i2i") else "hunyuan"


def _planned(role: str, source: Source, models_dir: Path, found: Path | None) -> PlannedFile:
    return PlannedFile(
        role, source.repo, source.path, models_dir / source.folder / source.name, found is not None, found,
        allow_patterns=source.allow_patterns, gated=source.gated,
    )  # fmt: skip


def _tokenizer_found(source: Source, models_dir: Path) -> Path | None:
    folder = models_dir / source.folder / source.name
    return folder if all((folder / name).is_file() for name in source.allow_patterns) else None


def plan_downloads(variant, models_dir: str | os.PathLike, *, folders: bool = False) -> list[PlannedFile]:
    """What `variant` needs under `models_dir`, in ComfyUI's folders, and whether each piece is already there:
    dit, qwen, clip and vae, then the tokenizers the single-file text encoders need outside ComfyUI.

    Missing text encoders and VAE are planned as ComfyUI's single files (`SINGLE_FILES`), or as the Hugging Face
    folders with `folders=True`. Pure: reads the disk, never writes or touches the network."""
    models_dir = Path(models_dir)
    sources = HF_FOLDERS if folders else SINGLE_FILES
    dit_name = Path(variant.hf_filename).name
    dit = Source(variant.hf_repo, variant.hf_filename, "diffusion_models", dit_name)
    kind = _vae_kind(variant)
    vae_folder = models_dir / "vae" / HF_FOLDERS[kind].name / "vae"
    found = {
        "dit": _intact(_find(models_dir, FOLDERS["dit"], (dit_name,))),
        "qwen": _find_folder(models_dir, FOLDERS["qwen"], QWEN_DIR)
        or _intact(_find(models_dir, FOLDERS["qwen"], COMFY_SINGLE_FILES["qwen"])),
        "clip": _find_folder(models_dir, FOLDERS["clip"], CLIP_DIR)
        or _intact(_find(models_dir, FOLDERS["clip"], COMFY_SINGLE_FILES["clip"])),
        "vae": vae_folder
        if all((vae_folder.parent / f).is_file() for f in VAE_FILES)
        else _intact(_find(models_dir, FOLDERS["vae"], COMFY_SINGLE_FILES[kind])),
    }
    plan = [
        _planned("dit", dit, models_dir, found["dit"]),
        _planned("qwen", sources["qwen"], models_dir, found["qwen"]),
        _planned("clip", sources["clip"], models_dir, found["clip"]),
        _planned("vae", sources[kind], models_dir, found["vae"]),
    ]
    if comfyui_root(models_dir) is None:
        for p in plan[1:3]:
            if p.found.is_file() if p.found is not None else not folders:  # a single file, there or planned
                source = TOKENIZERS[f"{p.role}_tokenizer"]
                plan.append(_planned(f"{p.role}_tokenizer", source, models_dir, _tokenizer_found(source, models_dir)))
    return plan


def comfyui_root(models_dir: Path) -> Path | None:
    """The ComfyUI install a models folder belongs to (it has the bundled tokenizers), if it is one."""
    root = Path(models_dir).resolve().parent
    return root if (root / "comfy" / "sd1_tokenizer").is_dir() else None


def tokenizer_dir(plan: list[PlannedFile], models_dir: Path) -> Path | None:
    """Where the tokenizers of single-file text encoders are: ComfyUI's root, or the text_encoders/ folder that
    `plan` put them in; None when the text encoders are folders (they bring their own)."""
    root = comfyui_root(models_dir)
    if root is not None:
        return root
    return Path(models_dir) / "text_encoders" if any(p.role.endswith("_tokenizer") for p in plan) else None


def model_paths(plan: list[PlannedFile], models_dir: Path | None = None) -> ModelPaths:
    by_role = {p.role: p.path for p in plan}
    return ModelPaths(
        dit=by_role["dit"],
        qwen=by_role["qwen"],
        clip=by_role["clip"],
        vae=by_role["vae"],
        tokenizer_dir=tokenizer_dir(plan, models_dir) if models_dir is not None else None,
    )


def download_command(variant_name: str, models_dir: Path) -> str:
    return f"python -m kandinsky_core download --variant {variant_name} --models-dir {models_dir}"


def missing_files_error(missing: list[PlannedFile], variant_name: str, models_dir: Path, why: str) -> MissingFilesError:
    lines = "\n".join(f"  - {p.describe()}" for p in missing)
    return MissingFilesError(
        f"{len(missing)} file(s) that variant {variant_name!r} needs are missing from {models_dir} and {why}:\n"
        f"{lines}\nDownload them where there is network access with:\n  {download_command(variant_name, models_dir)}\n"
        "or copy them to the paths above (or pass --dit/--text-encoder/--clip/--vae)."
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _check_connection(repo: str, endpoint: str) -> str | None:
    """None when the Hub answers (any HTTP status counts), else why not. One request with a short timeout.

    Plain urllib, so the check does not depend on which HTTP client this huggingface_hub version uses."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/api/models/{repo}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{endpoint} cannot be reached ({type(e).__name__}: {getattr(e, 'reason', e)})"
    return None


def _gated_message(p: PlannedFile) -> str:
    return (
        f"{p.repo} is a gated repository: accept its licence at https://huggingface.co/{p.repo} with your "
        "Hugging Face account, create a read token at https://huggingface.co/settings/tokens and either set "
        "HF_TOKEN=<token> or run `hf auth login` (older huggingface_hub: `huggingface-cli login`), then run the "
        f"download again. Or download without --folders: ComfyUI's ae.safetensors, the same VAE, is not gated."
    )


def _repo_files(p: PlannedFile, endpoint: str) -> list[str]:
    if p.filename != "*":
        return [p.filename]
    from huggingface_hub import HfApi

    files = HfApi(endpoint=endpoint).list_repo_files(p.repo)
    return [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in p.allow_patterns)]


def _fetch(p: PlannedFile, models_dir: Path, endpoint: str) -> None:
    """Each file into the staging folder (resumable), then renamed to its place unless something is there already."""
    from huggingface_hub import hf_hub_download

    staging = models_dir / STAGING_DIR / p.repo.replace("/", "--")
    for name in _repo_files(p, endpoint):
        target = p.dest if p.filename != "*" else p.dest / name
        if target.exists():
            continue
        got = Path(hf_hub_download(p.repo, name, local_dir=staging, endpoint=endpoint))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():  # another process may have put one there meanwhile: keep theirs
            os.replace(got, target)
    # The staging folder is ours alone; once a repository's files are in place its leftovers go too.
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when empty


def _is_network_error(e: BaseException) -> bool:
    """Connection drops surface as the HTTP client's own exception types, which differ across hub versions."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError | TimeoutError) or module in (
        "httpx",
        "httpx2",
        "requests",
        "urllib3",
        "huggingface_hub",
    )


def _interrupted(p: PlannedFile, name: str, models_dir: Path, e: BaseException) -> WeightsError:
    return WeightsError(
        f"Downloading {p.describe()} failed ({type(e).__name__}: {e}). Check the network and disk space, then run "
        f"`{download_command(name, models_dir)}` again: it resumes where it stopped."
    )


def ensure_files(
    variant, models_dir: str | os.PathLike, *, allow_download: bool = True, folders: bool = False, log=print
) -> list[PlannedFile]:
    """Download whatever `variant` lacks under `models_dir` (as single files, or the Hugging Face folders with
    `folders=True`); returns the updated plan.

    Offline (HF_HUB_OFFLINE=1, or the Hub unreachable within a few seconds), or with allow_download=False, it raises
    MissingFilesError naming every missing file, its source and its destination."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    from .variants import get_variant

    variant = get_variant(variant)
    models_dir = Path(models_dir)
    plan = plan_downloads(variant, models_dir, folders=folders)
    missing = [p for p in plan if not p.present]
    if not missing:
        return plan
    name = variant.name
    if not allow_download:
        raise missing_files_error(missing, name, models_dir, "downloading was not allowed")
    if _offline():
        raise missing_files_error(missing, name, models_dir, "HF_HUB_OFFLINE is set, so nothing can be downloaded")
    endpoint = _endpoint()
    why = _check_connection(missing[0].repo, endpoint)
    if why:
        raise missing_files_error(missing, name, models_dir, f"the Hugging Face Hub is unreachable: {why}")

    for p in missing:
        log(f"Downloading {p.describe()}")
        try:
            _fetch(p, models_dir, endpoint)
        except GatedRepoError as e:
            raise WeightsError(_gated_message(p)) from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if p.gated and status in (401, 403):
                raise WeightsError(_gated_message(p)) from e
            raise _interrupted(p, name, models_dir, e) from e
        except Exception as e:
            if not _is_network_error(e):
                raise
            raise _interrupted(p, name, models_dir, e) from e
    return plan_downloads(variant, models_dir, folders=folders)
