"""Reading PNG / JPEG files for the converters (the DeepMind LIDC crops and the ISIC3 folder).

Pillow does the decoding: it is a required dependency of matplotlib (>= 3.3), which amisbench depends on,
so it is always installed; it is imported lazily, only by ``amisbench data prepare``. matplotlib's own
``imread`` is not used because it returns PNGs as floats in [0, 1], which hides the raw 0/255 mask values
that the converters check, and it reads JPEG through Pillow anyway.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amisbench.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: the most pixels a dataset image may have (a 180x180 LIDC crop has 32,400, a full ISIC photograph up to about
#: 24 million); a file that declares more is refused before it is decoded (a decompression bomb expands a few
#: kilobytes of PNG into gigabytes)
MAX_PIXELS = 1 << 26
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise UserError("reading PNG/JPEG files needs Pillow (installed with matplotlib); "
                        "run: pip install pillow") from None
    return Image


def read_raw(path: Path) -> np.ndarray:
    """The stored pixel values of an image file, without scaling.

    Returns:
        (H,W) for grayscale, palette (indices) and bilevel files, (H,W,C) for RGB(A); uint8, uint16 or bool.

    Raises:
        UserError: the file is missing, truncated or not an image.
    """
    Image = _pil()
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{path}: the image declares {w}x{h} = {w * h:,} pixels, above the limit of "
                                f"{MAX_PIXELS:,} pixels for a dataset image (a decompression bomb?)")
            im.load()
            if im.mode == "1":
                return np.asarray(im, dtype=bool)
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.uint16)
            if im.mode in ("I", "F"):
                return np.asarray(im)
            if im.mode in ("L", "P", "RGB", "RGBA", "LA"):
                return np.asarray(im)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit (e.g. an animated file's frames)
        raise UserError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise UserError(f"{path}: cannot read the image, it is truncated or not an image ({e})") from None


def to_unit(a: np.ndarray, path: Path) -> np.ndarray:
    """Integer pixel values -> float32 in [0, 1] by the dtype's range (uint8 / 255, uint16 / 65535)."""
    if a.dtype == bool:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    raise UserError(f"{path}: unsupported pixel type {a.dtype} (expected 8- or 16-bit)")


def binary_mask(a: np.ndarray, path: Path, *, lossy: bool = False) -> np.ndarray:
    """A stored mask -> uint8 (H,W) in {0,1}.

    Lossless files must hold 0/1 or 0/255 only (single-channel, or identical RGB channels). JPEG masks
    cannot be exact, so they are thresholded at 128 (the convention of loaders that read JPEG masks,
    e.g. CIMD's ``> 127``).

    Raises:
        UserError: other values, or differing colour channels.
    """
    if a.ndim == 3:
        if a.shape[2] in (2, 4):  # drop alpha
            a = a[..., :-1]
        if a.shape[2] == 3 and not lossy and not (np.array_equal(a[..., 0], a[..., 1])
                                                  and np.array_equal(a[..., 0], a[..., 2])):
            raise UserError(f"{path}: a mask must be single-channel (or gray RGB), found differing colour channels")
        a = a[..., 0] if not lossy else a.mean(axis=2)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if lossy:
        return (a > 127).astype(np.uint8)
    values = np.unique(a)
    if set(values.tolist()) <= {0, 1}:
        return a.astype(np.uint8)
    if set(values.tolist()) <= {0, 255}:
        return (a == 255).astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
    raise UserError(f"{path}: mask values must be 0/1 or 0/255, found {shown}")
