"""Crop + resize + flip + normalise of one uint8 HWC image in two separable passes (numba).

    resample_crop(image, top, left, height, width, out, scale, shift, layout, flip)

The filter, per axis: a **box** (pixel-area average, OpenCV's ``INTER_AREA`` weights) where the
crop is shrunk, **bilinear** (half-pixel centres, edge clamped: torch's ``interpolate(...,
align_corners=False)``) where it is enlarged. That is what FFCV's ``resize_crop`` does when both
axes shrink and close to what it does when they grow, but per axis, and about twice as fast on
shrinking crops: OpenCV's ``INTER_AREA`` takes a generic table-driven path for non-integer ratios,
while here the vertical pass is a weighted sum of whole source rows (vectorised) and only the
already-shrunk rows are filtered horizontally.

The horizontal pass writes the output row straight in the requested layout, flipped or not, so a
decoder that calls this needs no flip / normalise / transpose ops after it:

    layout LAYOUT_HWC_U8:   uint8  (H, W, 3), rounded (for the GPU path, normalised there)
    layout LAYOUT_CHW_F32:  float32 (3, H, W), value * scale[c] + shift[c]
    layout LAYOUT_HWC_F32:  float32 (H, W, 3), value * scale[c] + shift[c]

Colour jitter (``adjust_colors``) works on an unnormalised float32 HWC image between the two:
resample with ``scale = 1, shift = 0`` into a float HWC buffer, jitter it, and ``write_layout``
it into the output layout.
"""
from __future__ import annotations

import math

import numba
import numpy as np

LAYOUT_HWC_U8 = 0
LAYOUT_CHW_F32 = 1
LAYOUT_HWC_F32 = 2

__all__ = ["resample_crop", "axis_taps", "adjust_colors", "write_layout", "LAYOUT_HWC_U8", "LAYOUT_CHW_F32",
           "LAYOUT_HWC_F32"]


@numba.njit(cache=True)
def axis_taps(n_src, n_dst, flip):
    """Source indices and weights along one axis, tap-major: ``(idx, w)`` of shape ``(T, n_dst)``.

    Shrinking (``n_src >= n_dst``): output ``d`` averages the source interval
    ``[d * s, (d + 1) * s)``, ``s = n_src / n_dst``, each source pixel weighted by its overlap
    (OpenCV's computeResizeAreaTab). Enlarging: bilinear between the two nearest source centres.
    ``flip`` mirrors the output (column ``d`` gets the taps of ``n_dst - 1 - d``). Unused taps have
    weight 0 and a valid index."""
    if n_src >= n_dst:
        scale = n_src / n_dst
        taps = int(math.ceil(scale)) + 1
        idx = np.zeros((taps, n_dst), np.int64)
        w = np.zeros((taps, n_dst), np.float32)
        for d in range(n_dst):
            col = n_dst - 1 - d if flip else d
            f1 = d * scale
            f2 = f1 + scale
            s1 = int(math.ceil(f1))
            s2 = int(math.floor(f2))
            cell = min(scale, n_src - f1)
            k = 0
            if s1 - f1 > 1e-3:
                idx[k, col] = s1 - 1
                w[k, col] = (s1 - f1) / cell
                k += 1
            for s in range(s1, min(s2, n_src)):
                idx[k, col] = s
                w[k, col] = 1.0 / cell
                k += 1
            if f2 - s2 > 1e-3 and s2 < n_src:
                idx[k, col] = s2
                w[k, col] = min(min(f2 - s2, 1.0), cell) / cell
                k += 1
            for rest in range(k, taps):
                idx[rest, col] = idx[0, col]
        return idx, w
    scale = n_src / n_dst
    idx = np.zeros((2, n_dst), np.int64)
    w = np.zeros((2, n_dst), np.float32)
    for d in range(n_dst):
        col = n_dst - 1 - d if flip else d
        f = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(f), n_src - 1)
        i1 = i0 + 1 if i0 < n_src - 1 else i0
        frac = f - i0
        idx[0, col] = i0
        idx[1, col] = i1
        w[0, col] = 1.0 - frac
        w[1, col] = frac
    return idx, w


@numba.njit(cache=True)
def _horizontal(row, x_idx, x_w, acc):
    """acc[c, x] = sum_t x_w[t, x] * row[x_idx[t, x] + c]; tap-major so the inner loop runs over x."""
    acc[:] = 0.0
    for t in range(x_idx.shape[0]):
        ix = x_idx[t]
        wx = x_w[t]
        for x in range(acc.shape[1]):
            k = ix[x]
            wt = wx[x]
            acc[0, x] += wt * row[k]
            acc[1, x] += wt * row[k + 1]
            acc[2, x] += wt * row[k + 2]


@numba.njit(cache=True)
def _store(acc, out, y, scale, shift, layout):
    if layout == LAYOUT_HWC_U8:
        for x in range(acc.shape[1]):
            for c in range(3):
                out[y, x, c] = np.uint8(min(int(acc[c, x] + 0.5), 255))
    elif layout == LAYOUT_CHW_F32:
        for c in range(3):
            for x in range(acc.shape[1]):
                out[c, y, x] = acc[c, x] * scale[c] + shift[c]
    else:
        for x in range(acc.shape[1]):
            for c in range(3):
                out[y, x, c] = acc[c, x] * scale[c] + shift[c]


@numba.njit(cache=True)
def resample_crop(image, top, left, height, width, out, scale, shift, layout, flip):
    """Resize ``image[top:top+height, left:left+width]`` (uint8 HWC) into ``out`` (see the module doc).

    ``scale`` / ``shift``: float32 (3,), applied to float layouts only. ``flip``: mirror horizontally.
    The horizontal pass (gathers, the costly one) runs on whichever is fewer: the output rows
    (shrinking: rows are combined first) or the crop's rows (enlarging: rows are combined last)."""
    if layout == LAYOUT_CHW_F32:
        out_h, out_w = out.shape[1], out.shape[2]
    else:
        out_h, out_w = out.shape[0], out.shape[1]
    y_idx, y_w = axis_taps(height, out_h, False)
    x_idx, x_w = axis_taps(width, out_w, flip)
    x_idx *= 3  # offsets into a row of interleaved RGB
    rows = image.reshape(image.shape[0], image.shape[1] * 3)[top:top + height, left * 3:(left + width) * 3]
    acc = np.empty((3, out_w), np.float32)
    if height >= out_h:
        row = np.empty(width * 3, np.float32)
        for y in range(out_h):
            src = rows[y_idx[0, y]]
            wt = y_w[0, y]
            for e in range(width * 3):
                row[e] = wt * src[e]
            for t in range(1, y_idx.shape[0]):
                wt = y_w[t, y]
                if wt != 0.0:
                    src = rows[y_idx[t, y]]
                    for e in range(width * 3):
                        row[e] += wt * src[e]
            _horizontal(row, x_idx, x_w, acc)
            _store(acc, out, y, scale, shift, layout)
    else:
        # enlarging: each source row is filtered horizontally once, and only the two in use are
        # kept (the output rows walk down the crop), so the scratch stays small and in cache
        lo = np.empty((3, out_w), np.float32)
        hi = np.empty((3, out_w), np.float32)
        lo_row = -1
        hi_row = -1
        for y in range(out_h):
            r0 = y_idx[0, y]
            r1 = y_idx[1, y]
            if r0 != lo_row:
                if r0 == hi_row:
                    lo, hi = hi, lo
                    lo_row, hi_row = hi_row, lo_row
                else:
                    _horizontal(rows[r0], x_idx, x_w, lo)
                    lo_row = r0
            if r1 != hi_row:
                _horizontal(rows[r1], x_idx, x_w, hi)
                hi_row = r1
            w0 = y_w[0, y]
            w1 = y_w[1, y]
            for c in range(3):
                for x in range(out_w):
                    acc[c, x] = w0 * lo[c, x] + w1 * hi[c, x]
            _store(acc, out, y, scale, shift, layout)


# luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2)
_GRAY = (0.2989, 0.587, 0.114)


@numba.njit(cache=True)
def adjust_colors(pixels, factors, order):
    """Brightness, contrast and saturation of a float32 (H, W, 3) image in [0, 255], in place:
    torchvision's ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation`` by
    ``factors[0..2]``, applied in ``order`` (a permutation of 0, 1, 2), each result clamped to
    [0, 255]. Brightness blends with black, contrast with the image's mean grey level,
    saturation with the pixel's own grey level."""
    h, w = pixels.shape[0], pixels.shape[1]
    for op in order:
        f = np.float32(factors[op])
        if op == 1:
            mean = 0.0
            for y in range(h):
                for x in range(w):
                    mean += _GRAY[0] * pixels[y, x, 0] + _GRAY[1] * pixels[y, x, 1] + _GRAY[2] * pixels[y, x, 2]
            base = np.float32(mean / (h * w))
        for y in range(h):
            for x in range(w):
                if op == 2:
                    base = np.float32(_GRAY[0] * pixels[y, x, 0] + _GRAY[1] * pixels[y, x, 1]
                                      + _GRAY[2] * pixels[y, x, 2])
                elif op == 0:
                    base = np.float32(0.0)
                for c in range(3):
                    v = f * pixels[y, x, c] + (np.float32(1.0) - f) * base
                    pixels[y, x, c] = min(max(v, np.float32(0.0)), np.float32(255.0))


@numba.njit(cache=True)
def write_layout(pixels, out, scale, shift, layout):
    """Write a float32 (H, W, 3) image in [0, 255] into ``out`` in ``layout`` (as resample_crop does)."""
    acc = np.empty((3, pixels.shape[1]), np.float32)
    for y in range(pixels.shape[0]):
        for c in range(3):
            for x in range(pixels.shape[1]):
                acc[c, x] = pixels[y, x, c]
        _store(acc, out, y, scale, shift, layout)
