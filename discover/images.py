"""Read one image file into an upright RGB ``uint8`` array, or fail with a clear reason.

This is the first step of the pipeline (image -> features -> graph -> box). Pillow
decodes: it raises on truncated files (where OpenCV silently returns a grey-filled
image), and it understands EXIF orientation, palette, CMYK, 16-bit and alpha modes.

Conventions:

- EXIF orientation is applied, so every box refers to the upright image.
- Grayscale, palette and CMYK become RGB; 16-bit images are scaled to 8 bits
  (``v / 257``); arrays follow :func:`to_rgb_array`'s dtype rules.
- Alpha is composited over white.
- Decompression-bomb guard: no image is ever decoded above ``max_pixels`` (default
  100 MP), with or without ``max_side``, and nothing above :data:`HARD_MAX_PIXELS` is
  decoded at all. With a ``max_side``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale
  straight from its DCT (Pillow's ``draft``), so a huge JPEG passes when its reduced
  size fits the guard; other formats (PNG, TIFF, WebP, BMP) have no reduced decoding in
  Pillow and are decoded whole, so for them the guard is a hard cap whatever
  ``max_side`` says. The size is checked on the header, before a pixel is decoded.
  Everything is then downscaled to ``max_side``: the returned :class:`LoadedImage`
  keeps the original upright size so boxes can be mapped back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from discover.errors import ImageError

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 100_000_000
"""Default decompression-bomb guard: 100 megapixels (e.g. 10000 x 10000)."""
HARD_MAX_PIXELS = 1_500_000_000
"""Refused whatever the options: even decoded at 1/8 scale, a JPEG this large takes
seconds of entropy decoding (its header could also lie about a tiny file)."""
REDUCED_DECODING = {"JPEG": 8}
"""Formats Pillow decodes at a reduced scale (``Image.draft``), and the largest factor
per side. Pillow has no reduced decoding for PNG, TIFF, WebP or BMP."""

_ORIENTATION_SWAPS = {5, 6, 7, 8}

# Pillow's own bomb guard is a module global: it is lifted only while a header is parsed,
# under this lock, so that concurrent decoding threads cannot leave it lifted for good.
_PIL_GUARD_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An upright RGB image and the size of the original (upright) picture."""

    array: np.ndarray
    """``uint8 [H, W, 3]``, possibly downscaled from the original."""
    original_size: tuple[int, int]
    """``(width, height)`` of the upright original, in pixels."""

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of :attr:`array`."""
        return int(self.array.shape[1]), int(self.array.shape[0])


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the path's extension is one we read (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def read_image(
    path: str | os.PathLike[str],
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Read ``path`` into an upright RGB uint8 array.

    Args:
        path: the image file.
        max_side: if given, the image is downscaled on read so its longer side is
            at most this many pixels (cheap for huge JPEGs thanks to ``draft``).
        max_pixels: decompression-bomb guard used when ``max_side`` is None.

    Raises:
        ImageError: with a one-line reason (missing file, empty file, not an image,
            truncated, too large, permission denied, ...).
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ImageError(f"broken symbolic link -> {os.readlink(p)}")
    if not p.exists():
        raise ImageError("file not found")
    if p.is_dir():
        raise ImageError("is a directory, not an image")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot stat file: {e.strerror or e}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with open(p, "rb") as f:
            return _decode(f, max_side=max_side, max_pixels=max_pixels)
    except PermissionError:
        raise ImageError("permission denied") from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            msg = "truncated image file"
        raise ImageError(f"cannot decode image: {msg}") from None


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array (HxW, HxWx1/3/4, uint8/uint16/float) to RGB uint8.

    PIL images get their EXIF orientation applied. Arrays are taken as RGB(A), alpha
    composited over white. Values: ``uint8`` as is; ``uint16`` as 16-bit (``v / 257``);
    other integer arrays as 8-bit when they fit 0..255 (e.g. ``int64`` from arithmetic),
    else as 16-bit; floats in ``[0, 1]`` are scaled by 255 and floats in ``[0, 255]``
    rounded; other ranges are min-max scaled.
    """
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        return _pil_to_rgb(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    arr = _to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = _composite_white(arr[:, :, :3], arr[:, :, 3])
    return np.ascontiguousarray(arr)


def _decode(fileobj, *, max_side: int | None, max_pixels: int) -> LoadedImage:
    # We apply our own guard below (it knows about max_side), so Pillow's is lifted while
    # the header is read. Mutating that global is not thread-safe: hold a lock.
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(fileobj)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"invalid image size {w}x{h}")
    # Before anything else reads the file: Pillow's PNG getexif() decodes the image.
    _check_size(img, max_side=max_side, max_pixels=max_pixels)
    orientation = _orientation(img)
    original = (h, w) if orientation in _ORIENTATION_SWAPS else (w, h)
    img.load()
    img = ImageOps.exif_transpose(img)
    arr = _pil_to_rgb(img)
    if max_side is not None and max(arr.shape[:2]) > max_side:
        arr = resize_longer_side(arr, max_side)
    return LoadedImage(arr, (int(original[0]), int(original[1])))


def _check_size(img: Image.Image, *, max_side: int | None, max_pixels: int) -> None:
    """Refuse, from the header alone, an image whose decoding would exceed the guard.

    With ``max_side`` a JPEG is set to decode at a reduced scale first (``draft``,
    which changes ``img.size`` to the size that will be decoded). The refusal says what
    would help, and only what would.
    """
    w, h = img.size
    fmt = img.format or "this format"
    factor = REDUCED_DECODING.get(img.format or "", 1)
    mp = f"{w}x{h} = {w * h / 1e6:.0f} MP"
    if w * h > HARD_MAX_PIXELS:
        raise ImageError(
            f"too large: {mp} exceeds the {HARD_MAX_PIXELS / 1e6:.0f} MP limit of any read "
            "(decompression-bomb guard)"
        )
    if max_side is not None and factor > 1 and max(w, h) > max_side:
        # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT: fast and small.
        scale = max_side / max(w, h)
        img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
    dw, dh = img.size
    if dw * dh <= max_pixels:
        return
    smallest = -(-w // factor) * -(-h // factor)  # decoded at the largest reduction
    guard = f"exceeds the {max_pixels / 1e6:.0f} MP decompression-bomb guard"
    if factor == 1:
        msg = f"{mp} {guard} ({fmt} has no reduced decoding: --max-size does not help)"
    elif smallest > max_pixels:
        msg = f"{mp} {guard}, even decoded at 1/{factor} scale"
    elif max_side is None:
        msg = f"{mp} {guard}; pass --max-size to downscale it"
    else:
        msg = (
            f"{mp}, decoded at {dw}x{dh} for this --max-size, {guard}; a smaller "
            "--max-size decodes it at a smaller scale"
        )
    raise ImageError(f"too large: {msg}")


def resize_longer_side(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is ``max_side`` (area interpolation, aspect kept)."""
    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF: treat as upright
        return 1


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # PIL decodes 16-bit PNG/TIFF data into these modes: scale the full 16-bit range.
        arr = _to_uint8(np.asarray(img), sixteen_bit=mode != "F")
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        return _composite_white(rgba[:, :, :3], rgba[:, :, 3])
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _to_uint8(arr: np.ndarray, *, sixteen_bit: bool = False) -> np.ndarray:
    """Map any numeric array to uint8.

    - ``uint8`` as is, ``bool`` to 0/255;
    - ``uint16`` (or ``sixteen_bit``, for PIL's 16-bit modes) as 16-bit data: ``v / 257``;
    - other integers: kept when all values lie in 0..255 (an 8-bit image in a wider
      dtype), read as 16-bit when they lie in 0..65535, min-max scaled otherwise;
    - floats: ``[0, 1]`` scaled by 255, ``[0, 255]`` rounded, anything else min-max
      scaled; NaN and infinities become 0.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if arr.dtype == np.uint16 or (sixteen_bit and lo >= 0):
            return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        arr = arr.astype(np.float64)
        return _minmax_uint8(arr, np.ones(arr.shape, dtype=bool))
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise ImageError("image has no finite pixel values")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = np.where(finite, arr, 0.0) * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = np.where(finite, arr, 0.0)
    else:
        return _minmax_uint8(arr, finite)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _minmax_uint8(arr: np.ndarray, finite: np.ndarray) -> np.ndarray:
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def iter_image_paths(
    paths: Iterable[str | os.PathLike[str]], recursive: bool = False
) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Folders contribute their files with a supported extension (case-insensitive), recursively
    with ``recursive``. Files named explicitly are kept whatever their extension (so a bad
    file yields an error record rather than silently vanishing). Missing paths raise. A file
    reached twice (named and inside a named folder) is listed once, where first met.
    """
    out: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found = sorted(q for q in it if (q.is_file() or q.is_symlink()) and is_image_file(q))
            out.update(dict.fromkeys(found))
        elif p.exists() or p.is_symlink():
            out[p] = None
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return list(out)
