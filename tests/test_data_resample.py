"""datasets/resample.py against independent references: exact interval-overlap box weights,
torch's own bilinear interpolation, and OpenCV's INTER_AREA."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssal_datasets.resample import LAYOUT_CHW_F32, LAYOUT_HWC_F32, LAYOUT_HWC_U8, resample_crop

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
SCALE = (1 / STD).astype(np.float32)
SHIFT = (-MEAN / STD).astype(np.float32)
IDENTITY = (np.ones(3, np.float32), np.zeros(3, np.float32))


def axis_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """(n_dst, n_src) weights. Shrinking: output cell [d*s, (d+1)*s) averages the source pixels it
    overlaps, by overlap length. Enlarging: torch's linear interpolation (align_corners=False),
    read off by interpolating the identity."""
    if n_src >= n_dst:
        s = n_src / n_dst
        m = np.zeros((n_dst, n_src))
        for d in range(n_dst):
            lo, hi = d * s, (d + 1) * s
            for k in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_src)):
                m[d, k] = max(0.0, min(hi, k + 1) - max(lo, k)) / s
        return m
    eye = torch.eye(n_src, dtype=torch.float64)[None]  # (1, n_src channels, n_src length)
    return F.interpolate(eye, size=n_dst, mode="linear", align_corners=False)[0].T.numpy()


def reference(image, top, left, h, w, out_h, out_w, flip=False):
    """Float HWC resize of the crop, by the matrices above."""
    crop = image[top:top + h, left:left + w].astype(np.float64)
    out = np.einsum("yi,ijc,xj->yxc", axis_matrix(h, out_h), crop, axis_matrix(w, out_w))
    return out[:, ::-1] if flip else out


def run(image, top, left, h, w, out_h, out_w, layout, flip=False, norm=IDENTITY):
    shape = (3, out_h, out_w) if layout == LAYOUT_CHW_F32 else (out_h, out_w, 3)
    out = np.zeros(shape, np.uint8 if layout == LAYOUT_HWC_U8 else np.float32)
    resample_crop(image, top, left, h, w, out, norm[0], norm[1], layout, flip)
    return out


# (image h, w, crop top, left, h, w, output h, w): shrink, enlarge, mixed, identity, extremes, edges
CASES = [(120, 90, 7, 3, 100, 80, 32, 24), (40, 50, 5, 9, 13, 17, 32, 32), (60, 60, 0, 0, 60, 11, 24, 24),
         (50, 70, 10, 20, 17, 45, 24, 24), (33, 33, 0, 0, 33, 33, 33, 33), (300, 20, 0, 0, 300, 20, 7, 40),
         (9, 9, 8, 8, 1, 1, 5, 5), (64, 64, 63, 0, 1, 64, 16, 16), (97, 131, 1, 2, 95, 128, 96, 96)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("flip", [False, True])
def test_float_layouts_match_reference(case, flip):
    ih, iw, top, left, h, w, oh, ow = case
    image = np.random.default_rng(sum(case)).integers(0, 256, (ih, iw, 3), dtype=np.uint8)
    expected = (reference(image, top, left, h, w, oh, ow, flip) - MEAN) / STD
    hwc = run(image, top, left, h, w, oh, ow, LAYOUT_HWC_F32, flip, (SCALE, SHIFT))
    chw = run(image, top, left, h, w, oh, ow, LAYOUT_CHW_F32, flip, (SCALE, SHIFT))
    np.testing.assert_allclose(hwc, expected, atol=2e-5, rtol=0)
    assert np.array_equal(chw, hwc.transpose(2, 0, 1))


@pytest.mark.parametrize("case", CASES)
def test_uint8_layout_rounds_the_reference(case):
    ih, iw, top, left, h, w, oh, ow = case
    image = np.random.default_rng(sum(case)).integers(0, 256, (ih, iw, 3), dtype=np.uint8)
    out = run(image, top, left, h, w, oh, ow, LAYOUT_HWC_U8).astype(int)
    ref = reference(image, top, left, h, w, oh, ow)
    diff = np.abs(out - np.floor(ref + 0.5))
    tie = np.abs(ref - np.floor(ref) - 0.5) < 1e-3  # float32 sums may land either side of .5
    assert diff.max() <= 1 and not diff[~tie].any()
    flipped = run(image, top, left, h, w, oh, ow, LAYOUT_HWC_U8, flip=True)
    assert np.array_equal(flipped, out[:, ::-1])


def test_identity_size_copies_the_crop():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(run(image, 2, 5, 16, 24, 16, 24, LAYOUT_HWC_U8), image[2:18, 5:29])


def test_shrinking_matches_opencv_inter_area():
    """FFCV resizes with OpenCV's INTER_AREA; on shrinking crops this is the same filter."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        ih, iw = rng.integers(160, 400, 2)
        image = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        h, w = rng.integers(96, ih + 1), rng.integers(96, iw + 1)
        top, left = rng.integers(0, ih - h + 1), rng.integers(0, iw - w + 1)
        ours = run(image, top, left, h, w, 96, 96, LAYOUT_HWC_U8).astype(int)
        cv = cv2.resize(image[top:top + h, left:left + w], (96, 96), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(ours - cv).max() <= 1 and (ours != cv).mean() < 0.01


def test_enlarging_matches_torch_bilinear():
    """torchvision's RandomResizedCrop enlarges with exactly this bilinear filter."""
    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ours = run(image, 4, 6, 21, 30, 64, 48, LAYOUT_CHW_F32)
    crop = torch.from_numpy(image[4:25, 6:36]).permute(2, 0, 1)[None].double()
    tv = F.interpolate(crop, size=(64, 48), mode="bilinear", align_corners=False, antialias=True)[0]
    np.testing.assert_allclose(ours, tv.numpy(), atol=1e-3, rtol=0)
