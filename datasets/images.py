"""Robust image reading for the beton writers.

Real collections hold files that a naive ``Image.open(p).convert("RGB")`` handles wrongly or
not at all: CMYK and grayscale JPEGs, PNGs saved under a ``.JPEG`` name, 16-bit or palette
images, truncated and zero-byte files. :func:`load_rgb` turns everything decodable into an
``(H, W, 3) uint8`` array and raises :class:`Reject` (with a one-line reason) for the rest.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile

# Never decode a truncated file silently: PIL raises instead (the default, made explicit).
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif")
MAX_SIDE = 65535  # FFCV stores width/height as uint16
DRAFT_SIDE = 8  # load_rgb(draft=True) asks libjpeg for at least this many pixels a side


class Reject(Exception):
    """An input file that cannot be converted; ``str(err)`` is the reason written to rejects.txt."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bit, PIL would clip
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (incl. Adobe-inverted, handled by PIL), YCbCr, LAB, F ...


def _opened(source):
    """``(what PIL opens, size in bytes)`` of a path, the bytes of an image, or a member of a tar file
    (anything with ``read()``: :class:`ssal_datasets.tars.TarMember`)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return source, os.path.getsize(source)
        data = source if isinstance(source, bytes) else source.read()
    except OSError as err:
        raise Reject(f"unreadable: {err.strerror or err}") from None
    return io.BytesIO(data), len(data)


def load_rgb(source, max_resolution: int | None = None, draft: bool = False) -> np.ndarray:
    """Decode ``source`` (a path, an image's bytes or a tar member) to an ``(H, W, 3) uint8`` C-contiguous
    array, or raise :class:`Reject`.

    ``draft=True`` lets libjpeg decode at a reduced DCT scale (still reading every byte, so
    truncation is still detected); it is used for the fast validity pre-pass only.
    """
    opened, size = _opened(source)
    if size == 0:
        raise Reject("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as img:
                w, h = img.size
                if w < 1 or h < 1:
                    raise Reject(f"bad size {w}x{h}")
                if draft and img.format == "JPEG":
                    # the smallest DCT scale (1/8): every coefficient is still entropy-decoded, so damage is
                    # still found, but the inverse DCT is a DC term: the check pass costs less than a decode
                    img.draft(img.mode if img.mode != "CMYK" else "CMYK", (DRAFT_SIDE, DRAFT_SIDE))
                img.load()
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                rgb = _to_rgb(img)
                arr = np.asarray(rgb, dtype=np.uint8)
    except Reject:
        raise
    except Image.DecompressionBombError as err:
        raise Reject(f"too large: {err}") from None
    except Image.DecompressionBombWarning as err:
        raise Reject(f"too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise Reject("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        msg = str(err).strip() or type(err).__name__
        if "truncated" in msg.lower():
            raise Reject(f"truncated: {msg}") from None
        raise Reject(f"decode error: {msg}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise Reject(f"unexpected decoded shape {arr.shape}")
    if not draft and max(arr.shape[:2]) > MAX_SIDE and not max_resolution:
        raise Reject(f"too large for FFCV: {arr.shape[1]}x{arr.shape[0]} (max side {MAX_SIDE}; use --max-resolution)")
    return np.ascontiguousarray(arr)


def probe(source, max_resolution: int | None) -> tuple[int, int]:
    """Check that ``source`` (as :func:`load_rgb`) decodes; return the (height, width) it will be stored at."""
    if not isinstance(source, (str, os.PathLike, bytes)):
        source = _opened(source)[0].getvalue()  # a tar member: read once
    load_rgb(source, max_resolution, draft=True)
    with Image.open(source if not isinstance(source, bytes) else io.BytesIO(source)) as img:
        w, h = img.size
    if max_resolution and max(h, w) > max_resolution:
        ratio = max_resolution / max(h, w)
        h, w = int(h * ratio), int(w * ratio)
    if max(h, w) > MAX_SIDE:
        raise Reject(f"too large for FFCV: {w}x{h} (max side {MAX_SIDE}; use --max-resolution)")
    return h, w
