#!/usr/bin/env python
"""Writer benchmark: images/s of datasets/write_ffcv.py's writer from extracted JPEG files and
from the ILSVRC2012 tar form (read in place), and of FFCV's own ``ffcv.writer.DatasetWriter``
fed by torchvision's ``ImageFolder`` (as ffcv-imagenet's write_imagenet.py does), side by side
in one run on the same images with the same image settings (max side 500, half JPEG q90 / half
raw, ``--workers`` processes).

The images are generated here into a temporary folder: ``--images`` JPEGs (q90) of 350-400 px
a side from a colour gradient, blobs and noise, so their files weigh about like photos' (the
mean size is printed), in ``--classes`` class folders, and packed the way ImageNet ships them
(a train tar of per-class tars). Our writer's figure includes its check pass (every file
decoded once first, bad files listed); FFCV's has none. Rounds alternate the three (a
different one first in each round) after an untimed warm-up write of each; the medians over
the rounds are reported with their ratios. The files sit in the page cache here, so the
tar/extracted figure compares CPU cost, not a disk's.

    python bench/writer.py [--images 1500] [--classes 10] [--workers N] [--rounds 3]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

WARM_UP = 64  # images of each kind written once before the timed rounds (fewer than a class holds)
WRITER_SETTINGS = dict(max_resolution=500, write_mode="proportion", compress_probability=0.5, jpeg_quality=90)


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient and a few soft blobs (drawn at a quarter of the size, then enlarged) under luminance and
    colour noise: JPEG files near the size of photos of that size."""
    from PIL import Image

    sh, sw = h // 4, w // 4
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32) * 4
    small = np.empty((sh, sw, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-0.4, 0.4, 2)
        small[..., c] = rng.uniform(40, 200) + a * y + b * x
    for _ in range(int(rng.integers(3, 8))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        small += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
    img = np.asarray(Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                     np.float32)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 24 + rng.standard_normal((h, w, 3), dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(src: Path, images: int, classes: int, seed: int = 0) -> int:
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for k in range(images):
        w = f"n{1440764 + 9973 * (k % classes):08d}"
        h, wd = int(rng.integers(350, 401)), int(rng.integers(350, 401))
        path = src / w / f"{w}_{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, h, wd)).save(path, quality=90)
        total += path.stat().st_size
    return total


def pack_train_tar(src: Path, path: Path) -> None:
    """ILSVRC2012_img_train.tar's form: one uncompressed <wnid>.tar per class inside."""
    with tarfile.open(path, "w") as outer:
        for class_dir in sorted(src.iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted(class_dir.iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{class_dir.name}.tar")
            info.size = len(buf.getvalue())
            buf.seek(0)
            outer.addfile(info, buf)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1500, help="generated JPEGs (default 1500)")
    parser.add_argument("--classes", type=int, default=10, help="class folders / per-class tars (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="timed writes of each kind (default 3)")
    args = parser.parse_args(argv)
    if args.images < args.classes * WARM_UP:
        parser.error(f"--images must be at least {WARM_UP} per class (--classes {args.classes}): "
                     f"{args.classes * WARM_UP} or more")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    from ssal_datasets.layouts import ClassInfo, Source, class_folders
    from ssal_datasets.tars import index_nested_tar
    from ssal_datasets.writer import WriterSettings, prepare_out_dir, write_source

    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    try:
        t0 = time.perf_counter()
        total = generate(work / "train", args.images, args.classes, args.seed)
        pack_train_tar(work / "train", work / "ILSVRC2012_img_train.tar")
        print(f"generated {args.images} JPEGs of 350-400 px (mean {total / args.images / 1024:.0f} KiB, q90) in "
              f"{args.classes} classes and their train tar in {time.perf_counter() - t0:.0f} s; "
              f"{args.workers} workers, {os.cpu_count()} CPUs", flush=True)
        settings = WriterSettings(**WRITER_SETTINGS, workers=args.workers)
        wnids, files = class_folders(work / "train", "bench")
        members = index_nested_tar(str(work / "ILSVRC2012_img_train.tar"))
        in_tar = [(m, k) for k, w in enumerate(wnids) for m in sorted(members[w], key=lambda m: m.basename)]
        classes = [ClassInfo(w, w) for w in wnids]

        def ours(items, name, of_classes=classes):
            out = prepare_out_dir(work / name, overwrite=True)
            write_source(Source("bench", None, of_classes, {"train": items}), out, settings, log=lambda *a: None)

        def ffcv_own(indices=None):
            fields = {"image": RGBImageField(write_mode="proportion", max_resolution=500, jpeg_quality=90,
                                             compress_probability=0.5), "label": IntField()}
            DatasetWriter(str(work / "ffcv.beton"), fields, num_workers=args.workers).from_indexed_dataset(
                ImageFolder(str(work / "train")), indices=indices, chunksize=100)

        kinds = {"extracted": lambda: ours(files, "out-extracted"), "tar": lambda: ours(in_tar, "out-tar"),
                 "ffcv": ffcv_own}
        # warm-up, not timed: the first write of a process pays imports and compilation
        ours(files[:WARM_UP], "out-extracted", classes[:1])  # the first images, all of class 0
        ours(in_tar[:WARM_UP], "out-tar", classes[:1])
        ffcv_own(list(range(WARM_UP)))
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for kind in order:
                t = time.perf_counter()
                kinds[kind]()
                rates[kind].append(args.images / (time.perf_counter() - t))
            print(f"round {r}: " + "   ".join(f"{k} {rates[k][-1]:6.0f} img/s" for k in names), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"median of {args.rounds}: our writer from extracted files {med['extracted']:.0f} img/s, from the tar "
              f"{med['tar']:.0f} img/s (tar/extracted {med['tar'] / med['extracted']:.2f}x); FFCV's DatasetWriter "
              f"{med['ffcv']:.0f} img/s (ours/FFCV: extracted {med['extracted'] / med['ffcv']:.2f}x, "
              f"tar {med['tar'] / med['ffcv']:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
