"""Training throughput: the engine's real training step (engine.StandardTraining), measured side by side.

    python bench/train_throughput.py                       # GPU: ResNet-50, 176 px, bf16, channels-last
    python bench/train_throughput.py --device cpu --arch resnet18 --res 64 --batch 16 --steps 5   # smoke run

(a) synthetic, GPU-resident batches (the model's ceiling), (b) the FFCV train loader on a beton of
realistic-size JPEGs (generated into a temp dir unless --beton is given): img/s of each, and the
ratio (b)/(a) (target >= 0.95); then baseline vs SSAL x3 vs DKS x2 on synthetic data, all in one run.
`--json FILE` writes the figures as well (bench/gpu_check.sh): P3 = (b)/(a), P4 = ResNet-50 bf16
channels-last img/s on one GPU fed by FFCV (target >= 5000 on an H100/H200 at 176 px; FFCV's
published ResNet-50 run is ~3000 img/s per A100 end to end).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ssal_models
from pipeline.train.config import REPO_ROOT, OptimConfig
from pipeline.train.engine import StandardTraining
from pipeline.train.optim import build_optimizer


def make_training(arch: str, method: str, num_classes: int, device, amp: str, channels_last: bool):
    options = {}
    if method == "ssal":
        options["groupings"] = [[c % k for c in range(num_classes)] for k in (200, 334, 500)
                                if k <= num_classes // 2] or [[c % 2 for c in range(num_classes)]]
    torch.manual_seed(0)
    model = ssal_models.build_model(arch, method, num_classes, **options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig(), global_batch=256)
    return StandardTraining(model, model, optimizer, 0.1, device=device, amp=amp, channels_last=channels_last)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(training: StandardTraining, batches, steps: int, warmup: int) -> float:
    """img/s over `steps` steps after `warmup` steps; `batches` yields (images, labels) forever."""
    training.train_model.train()
    done = 0
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            sync(training.device)
            started = time.perf_counter()
        if training.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        training.step(images, labels)
        if i >= warmup:
            done += labels.shape[0]
        if i + 1 == warmup + steps:
            break
    sync(training.device)
    return done / (time.perf_counter() - started)


def synthetic_batches(batch: int, res: int, num_classes: int, device):
    images = torch.randn(batch, 3, res, res, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    while True:
        yield images, labels


def loader_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _bench_class(src: Path, index: int, per_class: int) -> None:
    """The JPEGs of one class of the bench tree (one process per class: minutes serially at 5000)."""
    from ssal_datasets.synth import make_bench_tree

    part = src / f"part{index}"
    make_bench_tree(part, num_classes=1, per_class=per_class, size_range=(300, 500), seed=100 + index)
    (part / "class000").rename(src / "train" / f"class{index:03d}")
    part.rmdir()


def write_bench_beton(workdir: Path, images: int, classes: int) -> Path:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ssal_datasets.synth import make_bench_tree

    src = workdir / "src"
    (src / "train").mkdir(parents=True)
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_bench_class, [src] * classes, range(classes), [images // classes] * classes))
    make_bench_tree(src / "val", num_classes=classes, per_class=1, size_range=(300, 500), seed=1)
    out = workdir / "betons"
    subprocess.run([sys.executable, str(REPO_ROOT / "datasets" / "write_ffcv.py"), "imagenet", "--root", str(src),
                    "--out", str(out), "--max-resolution", "500", "--write-mode", "jpg"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "train.beton"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=176, help="train crop size (FFCV recipe: 160-192)")
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--beton", help="train beton to read (default: generate realistic JPEGs)")
    parser.add_argument("--images", type=int, default=5000, help="images in the generated beton")
    parser.add_argument("--methods", default="baseline,ssal,dks")
    parser.add_argument("--json", help="write the figures to this file as well")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    amp = args.amp if device.type == "cuda" else "none"
    channels_last = not args.no_channels_last and device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.arch}, batch {args.batch}, {args.res} px, amp {amp}, channels_last {channels_last}")

    baseline = make_training(args.arch, "baseline", args.classes, device, amp, channels_last)
    synthetic = time_steps(baseline, synthetic_batches(args.batch, args.res, args.classes, device),
                           args.steps, args.warmup)
    from ssal_datasets.loader import create_train_loader

    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(args.beton) if args.beton else write_bench_beton(Path(tmp), args.images, min(args.classes, 100))
        loader = create_train_loader(beton, batch_size=args.batch, num_workers=args.workers, resolution=args.res,
                                     device=device, distributed=False, channels_last=channels_last)
        fed = time_steps(baseline, loader_batches(loader), args.steps, args.warmup)
        loader.close()
    print(f"(a) synthetic GPU-resident data: {synthetic:8.0f} img/s")
    print(f"(b) FFCV loader from beton:      {fed:8.0f} img/s   ratio (b)/(a) = {fed / synthetic:.3f}")

    rates = {}
    for method in args.methods.split(","):
        training = baseline if method == "baseline" else make_training(args.arch, method, args.classes, device,
                                                                       amp, channels_last)
        rates[method] = time_steps(training, synthetic_batches(args.batch, args.res, args.classes, device),
                                   args.steps, args.warmup)
        if device.type == "cuda":
            del training
            torch.cuda.empty_cache()
    print("method     img/s   x baseline")
    for method, rate in rates.items():
        print(f"{method:9s} {rate:7.0f}   {rate / rates.get('baseline', rate):.3f}")
    if args.json:
        figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "arch": args.arch, "batch": args.batch, "resolution": args.res, "amp": amp,
                   "channels_last": channels_last, "workers": args.workers, "steps": args.steps,
                   "synthetic_img_s": synthetic, "ffcv_fed_img_s": fed, "p3_fed_over_synthetic": fed / synthetic,
                   "p4_img_s": fed, "methods_img_s": rates,
                   "methods_over_baseline": {m: r / rates.get("baseline", r) for m, r in rates.items()}}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
