"""Reading input images and writing results: mp4 (PyAV, 24 fps) and png (Pillow), never half-written."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

FPS = 24
VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png",)


def check_output_path(path: str | os.PathLike, *, video: bool, overwrite: bool = False) -> Path:
    """Fail before any work if the output cannot be written: wrong suffix, existing file, a folder that cannot be
    created or written. Missing folders are created only once every other check has passed."""
    path = Path(path)
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if path.suffix.lower() not in allowed:
        kind = "a video" if video else "an image"
        raise InputError(
            f"Output {str(path)!r}: this variant makes {kind}, so the output must end in {' or '.join(allowed)}. "
            f"Pass e.g. --output out{allowed[0]}."
        )
    if path.is_dir():
        raise InputError(
            f"Output {str(path)!r} is a folder. Pass a file name, e.g. --output {path / 'out'}{allowed[0]}."
        )
    if path.exists() and not overwrite:
        raise InputError(f"Output {str(path)!r} already exists. Choose another --output or pass --overwrite.")
    ensure_writable_folder(path.parent, "Output folder", "Choose another --output.")
    return path


def ensure_writable_folder(folder: str | os.PathLike, what: str, fix: str) -> Path:
    """Create `folder` (and missing parents) and prove a file can be created in it, before any long work. On
    failure nothing is left behind (folders made here are removed) and InputError says why, then `fix`."""
    folder = Path(folder)
    missing, existing = [], folder
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f", so {str(folder)!r} cannot be created"
        raise InputError(f"{what} {str(folder)!r}: {str(existing)!r} is not a folder (it is a file){where}. {fix}")
    try:
        for d in reversed(missing):
            d.mkdir()
        probe = folder / f".kandinsky5-write-test-{secrets.token_hex(4)}"
        open(probe, "xb").close()
        probe.unlink()
    except OSError as e:
        for d in missing:
            try:
                d.rmdir()
            except OSError:
                pass
        raise InputError(f"{what} {str(folder)!r} cannot be written ({e.strerror or e}). {fix}") from None
    return folder


def rescue_output(frames: Tensor, path: str | os.PathLike) -> Path | None:
    """Write a finished result that could not go to `path` to the temporary folder (then the home folder) under
    a fresh name; the path written, or None when neither place can take it."""
    import tempfile

    path = Path(path)
    name = f"kandinsky5-rescued-{path.stem}-{secrets.token_hex(3)}{path.suffix.lower()}"
    for folder in (Path(tempfile.gettempdir()), Path.home()):
        try:
            return write_output(frames, folder / name)
        except (OSError, InputError):
            continue
    return None


def _open_image(path: Path):
    """The image file at `path`, opened lazily (header read); InputError naming --image when it is not a readable
    image file (missing, a folder or device, not an image, a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InputError(f"Input image {str(path)!r} does not exist. Pass an existing png/jpg/webp file with --image.")
    if not path.is_file():
        raise InputError(
            f"Input image {str(path)!r} is not a regular file (a folder or device). Pass a png, jpg or webp file "
            "with --image."
        )
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(
            f"Input image {str(path)!r} cannot be read as an image ({e}). Pass a png, jpg or webp file."
        ) from e


EXIF_ORIENTATION = 0x0112
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as it is shown (EXIF orientation applied), reading the header only."""
    with _open_image(Path(path)) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(EXIF_ORIENTATION) in SIDEWAYS else (w, h)


def _to_rgb_array(im) -> np.ndarray:
    """uint8 RGB [H, W, 3]: 16-bit greyscale scaled to 8 bits (not clipped at 255), alpha dropped, palette and
    greyscale converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 1.0 if im.mode == "F" and a.max() <= 1.0 else 65535.0
        a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file as uint8 RGB [3, H, W] (EXIF orientation applied; alpha dropped, palette, greyscale and 16-bit
    converted)."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with _open_image(path) as im:
            rgb = _to_rgb_array(ImageOps.exif_transpose(im))  # upright, as ComfyUI's LoadImage shows it
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(
            f"Input image {str(path)!r} cannot be read as an image ({e}). Pass a png, jpg or webp file."
        ) from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size (h', w') an h x w image is scaled to so that it covers width x height with its aspect kept: the
    official resize's `int(side / scale)`, which float rounding can leave one pixel short of the side that should
    fit exactly (800x600 -> 1408x640 gives 1407 px); that side is then the target itself, so nothing collapses."""
    scale = min(h / height, w / width)
    return max(int(h / scale), height), max(int(w / scale), width)


def resize(image: Tensor, width: int, height: int) -> Tensor:
    """Scale [C, H, W] to exactly width x height, nothing cut (the official I2V start image: its size keeps the
    image's aspect up to the rounding of the sides)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    x = F.interpolate(image.float()[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else x[0]


def resize_center_crop(image: Tensor, width: int, height: int) -> Tensor:
    """Scale [C, H, W] so it covers width x height, keeping its aspect, then cut the centre (as the official
    resize_video does: the short side fits, the long side is cropped symmetrically)."""
    h, w = image.shape[-2:]
    new_h, new_w = cover_size(h, w, height, width)
    x = image.float().unsqueeze(0)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[0, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else x


def to_uint8_frames(pixels: Tensor) -> Tensor:
    """VAE output [B, 3, F, H, W] (or [3, F, H, W]) in -1..1 -> frames uint8 [F, H, W, 3] (first batch item)."""
    if pixels.ndim == 5:
        pixels = pixels[0]
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


def _atomic_write(path: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename: an error leaves nothing behind."""
    if path.exists() and not overwrite:
        raise InputError(f"Output {str(path)!r} already exists. Choose another --output or pass --overwrite.")
    # Created like any file (not mkstemp's 0600), under a name no one else uses.
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.partial{path.suffix}"
    open(tmp, "xb").close()
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() refuses to replace a file that appeared meanwhile; rename() would silently clobber it.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise InputError(
                    f"Output {str(path)!r} appeared while writing. Choose another --output or pass --overwrite."
                ) from None
            except OSError:
                os.replace(tmp, path)  # filesystems without hard links
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _video_codec() -> str:
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different types across versions for unknown codecs
            continue
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders; reinstall av (pip install av).")


def write_video(frames: Tensor, path: str | os.PathLike, *, fps: int = FPS, overwrite: bool = False) -> Path:
    """Frames uint8 [F, H, W, 3] -> H.264 (or MPEG-4 part 2) yuv420p mp4. Odd sizes are edge-padded to even."""
    import av

    frames = frames.cpu()
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video needs uint8 frames [F, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    h, w = frames.shape[1:3]
    pad_h, pad_w = h % 2, w % 2
    array = frames.numpy()
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = _video_codec()

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = array.shape[2], array.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "16", "preset": "medium"}
            else:
                stream.bit_rate = 8_000_000
            for frame in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return _atomic_write(Path(path), overwrite, write)


def write_image(frame: Tensor, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """One frame uint8 [H, W, 3] (or [1, H, W, 3]) -> png."""
    from PIL import Image

    if frame.ndim == 4:
        frame = frame[0]
    image = Image.fromarray(frame.cpu().numpy())
    return _atomic_write(Path(path), overwrite, lambda tmp: image.save(tmp, format="PNG"))


def write_output(frames: Tensor, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """mp4 for .mp4 outputs, png (first frame) for .png outputs."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return write_video(frames, path, overwrite=overwrite)
    if suffix in IMAGE_SUFFIXES:
        return write_image(frames, path, overwrite=overwrite)
    raise InputError(f"Output {str(path)!r}: the suffix must be .mp4 (video) or .png (image).")


def read_video(path: str | os.PathLike) -> Tensor:
    """An mp4 decoded to uint8 frames [F, H, W, 3] (for checks and tests)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames))
