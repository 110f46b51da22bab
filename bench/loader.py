#!/usr/bin/env python
"""Loader benchmark: the same JPEG images through (a) ssal_datasets.loader from a beton and
(b) torchvision ImageFolder + PIL transforms + DataLoader, side by side in one run.

Both do random-resized-crop to --res, horizontal flip and ImageNet normalisation to float
tensors, with the same batch size and number of workers (FFCV: threads; DataLoader: processes,
persistent). The images are generated here (realistic 160-500 px JPEGs, quality 90) into a
temporary folder, then written to a beton with the writer's ImageNet defaults (max side 500,
half JPEG q90 / half raw). Rounds alternate a then b (b first in the first round); the first
round of each is a warm-up (JIT compilation, worker start) and is reported but left out of the
medians.

Epochs are a few thousand images so that each epoch's start (thread start, the first batches in
flight) weighs on either loader about as little as in a real epoch.

    python bench/loader.py [--images 3000] [--workers 2] [--batch-size 64] [--res 160] [--rounds 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="number of generated train images (default 3000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers (default: all CPUs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--res", type=int, default=160, help="crop output size (default 160)")
    parser.add_argument("--rounds", type=int, default=4, help="epochs per loader, the first one is warm-up")
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=500)
    parser.add_argument("--channels-last", action="store_true",
                        help="beton loader yields channels-last tensors (skips one copy; default: contiguous NCHW "
                             "like torchvision)")
    parser.add_argument("--keep", metavar="DIR", help="keep the generated images and beton in DIR")
    args = parser.parse_args(argv)

    import torch
    from ssal_datasets import loader as L
    from ssal_datasets.layouts import scan_imagenet
    from ssal_datasets.synth import make_bench_tree
    from ssal_datasets.writer import WriterSettings, prepare_out_dir, write_source

    threads = torch.get_num_threads()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        src = work / "src"
        if not (src / "train").is_dir():
            t0 = time.perf_counter()
            per = max(1, args.images // args.classes)
            make_bench_tree(src / "train", num_classes=args.classes, per_class=per,
                            size_range=(args.min_size, args.max_size))
            make_bench_tree(src / "val", num_classes=args.classes, per_class=1, size_range=(args.min_size, args.max_size), seed=1)
            print(f"generated {per * args.classes} JPEGs of {args.min_size}-{args.max_size} px in "
                  f"{time.perf_counter() - t0:.1f} s under {src}")
        out = work / "beton"
        if not (out / "manifest.json").exists():
            settings = WriterSettings(max_resolution=500, write_mode="proportion", compress_probability=0.5,
                                      jpeg_quality=90, workers=args.workers)
            write_source(scan_imagenet(src), prepare_out_dir(out, overwrite=True), settings, log=lambda *a: None)
        n = sum(1 for _ in (src / "train").rglob("*.JPEG"))

        ffcv_loader = L.create_train_loader(out / "train.beton", batch_size=args.batch_size,
                                            num_workers=args.workers, resolution=args.res, device="cpu",
                                            order="random", channels_last=args.channels_last, drop_last=False)
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        tf = T.Compose([T.RandomResizedCrop(args.res, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        tv_loader = torch.utils.data.DataLoader(ImageFolder(str(src / "train"), tf), batch_size=args.batch_size,
                                                shuffle=True, num_workers=args.workers, persistent_workers=True,
                                                drop_last=False)
        torch.set_num_threads(threads)

        def epoch(loader):
            t0 = time.perf_counter()
            count = 0
            for x, y in loader:
                count += x.shape[0]
            return count / (time.perf_counter() - t0)

        rates = {"ffcv": [], "torchvision": []}
        print(f"{n} images, res {args.res}, batch {args.batch_size}, workers {args.workers}, {os.cpu_count()} CPUs")
        for r in range(args.rounds):
            if r == 0:
                # fork the DataLoader's workers before the beton loader's buffers exist: forked after,
                # they would share those pages copy-on-write and make its next epoch copy every one
                b = epoch(tv_loader)
                a = epoch(ffcv_loader)
            else:
                a = epoch(ffcv_loader)
                b = epoch(tv_loader)
            rates["ffcv"].append(a)
            rates["torchvision"].append(b)
            tag = " (warm-up)" if r == 0 else ""
            print(f"round {r}{tag}: beton loader {a:8.0f} img/s   ImageFolder+DataLoader {b:8.0f} img/s   "
                  f"ratio {a / b:5.2f}x", flush=True)
        if args.rounds > 1:
            fa = statistics.median(rates["ffcv"][1:])
            fb = statistics.median(rates["torchvision"][1:])
            print(f"median after warm-up: beton loader {fa:.0f} img/s, ImageFolder+DataLoader {fb:.0f} img/s, "
                  f"ratio {fa / fb:.2f}x")
        ffcv_loader.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
