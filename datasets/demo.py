"""The built-in demo dataset: small, learnable, hierarchical, generated on the spot (no download).

``C`` classes (default 32) in ``S`` planted super-classes (default 8). Every image is a noisy
textured background with a few distractor blobs and one large *object*:

* the **super-class** fixes the object's shape family (disk, square, triangle, cross, ring,
  star, diamond, crescent) and its base hue (``S`` hues spread over the colour wheel) -- a
  coarse cue that survives random crops and low resolution;
* the **class** inside its super-class fixes two finer cues: the frequency of the stripes
  painted on the object (``1.5 + j`` cycles across it) and a small hue offset (8 degrees per
  class). Both are jittered per image (frequency +-0.35, hue +-5 degrees) so that neighbouring
  classes of a super-class overlap a little: a small network tells super-classes apart almost
  perfectly but confuses classes within a super-class, so the confusion matrix is block
  structured and clustering it recovers the planted super-classes.

Placement, size, rotation, brightness/saturation, background, distractors, Gaussian noise and
the JPEG quality are random. Everything is deterministic from ``seed``; the class -> super-class
assignment is a seeded permutation (class indices do not reveal super-classes).
"""
from __future__ import annotations

import colorsys
import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssal_datasets.cpus import usable_cpus

FAMILIES = ("disk", "square", "triangle", "cross", "ring", "star", "diamond", "crescent")


@dataclass(frozen=True)
class DemoSpec:
    num_classes: int = 32
    num_superclasses: int = 8
    train_per_class: int = 80
    val_per_class: int = 20
    image_size: int = 64
    seed: int = 0

    def check(self) -> None:
        from ssal_datasets.layouts import DataError
        if self.num_superclasses < 1 or self.num_classes < self.num_superclasses:
            raise DataError(f"demo: need 1 <= --num-superclasses ({self.num_superclasses}) <= --num-classes "
                            f"({self.num_classes})")
        if self.num_classes > 1000:
            raise DataError(f"demo: --num-classes {self.num_classes} is too many (max 1000)")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise DataError("demo: --images-per-class and --val-images-per-class must be >= 1")
        if not 16 <= self.image_size <= 512:
            raise DataError(f"demo: --image-size {self.image_size} must be in 16..512")


def class_table(spec: DemoSpec) -> list[dict]:
    """Per class: wnid, name, superclass, superclass_name, fine index j within the super-class."""
    rng = np.random.default_rng([spec.seed, 7919])
    sc = rng.permutation(np.arange(spec.num_classes) % spec.num_superclasses)
    counters = [0] * spec.num_superclasses
    out = []
    for i in range(spec.num_classes):
        s = int(sc[i])
        j = counters[s]
        counters[s] += 1
        fam = FAMILIES[s % len(FAMILIES)]
        sname = fam if spec.num_superclasses <= len(FAMILIES) else f"{fam}{s // len(FAMILIES)}"
        out.append({"wnid": f"demo{i:03d}", "name": f"{sname}-{chr(ord('a') + j) if j < 26 else j}",
                    "superclass": s, "superclass_name": sname, "fine": j})
    return out


# ------------------------------------------------------------------ drawing
def _shape_mask(family: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    c = (int(round(cx)), int(round(cy)))

    def poly(points):
        pts = []
        for a, rad in points:
            pts.append((cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)))
        cv2.fillPoly(m, [np.round(np.array(pts)).astype(np.int32)], 255, lineType=cv2.LINE_8)

    if family == "disk":
        cv2.circle(m, c, int(r), 255, -1)
    elif family == "square":
        poly([(math.pi / 4 + k * math.pi / 2, r * 1.05) for k in range(4)])
    elif family == "triangle":
        poly([(-math.pi / 2 + k * 2 * math.pi / 3, r * 1.2) for k in range(3)])
    elif family == "diamond":
        poly([(k * math.pi / 2, r * (1.25 if k % 2 == 0 else 0.7)) for k in range(4)])
    elif family == "star":
        poly([(-math.pi / 2 + k * math.pi / 5, r * (1.2 if k % 2 == 0 else 0.5)) for k in range(10)])
    elif family == "cross":
        w = r * 0.42
        for a in (0.0, math.pi / 2):
            d = (math.cos(a + angle), math.sin(a + angle))
            n = (-d[1], d[0])
            pts = [(cx + sx * r * 1.15 * d[0] + sy * w * n[0], cy + sx * r * 1.15 * d[1] + sy * w * n[1])
                   for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            cv2.fillPoly(m, [np.round(np.array(pts)).astype(np.int32)], 255)
    elif family == "ring":
        cv2.circle(m, c, int(r * 1.1), 255, -1)
        cv2.circle(m, c, int(r * 0.55), 0, -1)
    elif family == "crescent":
        cv2.circle(m, c, int(r * 1.1), 255, -1)
        off = (int(round(cx + 0.55 * r * math.cos(angle))), int(round(cy + 0.55 * r * math.sin(angle))))
        cv2.circle(m, off, int(r * 0.9), 0, -1)
    else:  # pragma: no cover
        raise ValueError(family)
    return m


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360.0, min(max(s, 0), 1), min(max(v, 0), 1))) * 255.0


def render(spec: DemoSpec, cls: dict, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class ``cls`` (an entry of :func:`class_table`)."""
    out_size = spec.image_size
    k = 4  # draw at 4x, then area-downsample: anti-aliased shapes and stripes
    size = out_size * k
    s, j = cls["superclass"], cls["fine"]
    # background: a random smooth gradient between two random dull colours + blotches
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.8))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.8))
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (np.cos(a) * xx + np.sin(a) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.float32)
    low = rng.normal(0, 1, (6, 6, 1)).astype(np.float32)
    img += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)[..., None] * 18.0
    # distractors: small blobs / bars of random colour
    for _ in range(rng.integers(2, 6)):
        col = tuple(float(v) for v in _hsv(rng.uniform(0, 360), rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0)))
        p = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        if rng.random() < 0.5:
            cv2.circle(img, p, int(rng.uniform(0.03, 0.08) * size), col, -1)
        else:
            q = (int(p[0] + rng.uniform(-0.2, 0.2) * size), int(p[1] + rng.uniform(-0.2, 0.2) * size))
            cv2.line(img, p, q, col, max(1, int(0.02 * size)))
    # the object
    r = rng.uniform(0.2, 0.32) * size
    cx, cy = rng.uniform(r * 1.1, size - r * 1.1), rng.uniform(r * 1.1, size - r * 1.1)
    angle = rng.uniform(-0.45, 0.45)
    mask = _shape_mask(FAMILIES[s % len(FAMILIES)], size, cx, cy, r, angle).astype(np.float32) / 255.0
    m = spec.num_classes / spec.num_superclasses  # classes per super-class (average)
    hue = 360.0 * s / spec.num_superclasses + (j - (m - 1) / 2) * 8.0 + rng.uniform(-5, 5)
    base = _hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.75, 1.0))
    freq = 1.5 + j + rng.uniform(-0.35, 0.35)  # stripe cycles across the object's diameter
    phi = rng.uniform(0, math.pi)
    u = ((xx * size - cx) * math.cos(phi) + (yy * size - cy) * math.sin(phi)) / (2 * r)
    stripes = (np.sin(2 * math.pi * freq * u + rng.uniform(0, 2 * math.pi)) > 0).astype(np.float32)
    obj = base[None, None] * (0.5 + 0.5 * stripes[..., None])
    img = img * (1 - mask[..., None]) + obj * mask[..., None]
    img = cv2.resize(img, (out_size, out_size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0, 7.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_class(args) -> int:
    spec, cls, ci, root, split, count, split_id = args
    d = Path(root) / split / cls["wnid"]
    d.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        rng = np.random.default_rng([spec.seed, split_id, ci, n])
        img = render(spec, cls, rng)
        quality = int(rng.integers(80, 96))
        ok, buf = cv2.imencode(".JPEG", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover
            raise RuntimeError("JPEG encoding failed")
        (d / f"{cls['wnid']}_{split}_{n:05d}.JPEG").write_bytes(buf.tobytes())
    return count


def generate_tree(spec: DemoSpec, root: str | os.PathLike, workers: int = 0) -> list[dict]:
    """Write the demo set as JPEG files in the ImageNet layout (train/<wnid>, val/<wnid>) under ``root``."""
    spec.check()
    table = class_table(spec)
    jobs = []
    for split, count, sid in (("train", spec.train_per_class, 0), ("val", spec.val_per_class, 1)):
        jobs += [(spec, cls, ci, str(root), split, count, sid) for ci, cls in enumerate(table)]
    workers = workers or usable_cpus()
    if workers <= 1:
        list(map(_write_class, jobs))
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(workers, len(jobs))) as pool:
            list(pool.imap_unordered(_write_class, jobs))
    return table
