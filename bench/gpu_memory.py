"""Peak GPU memory and time of the engine's training step, measured side by side in one run.

    .venv/bin/python bench/gpu_memory.py                    # GPU: both tables below
    .venv/bin/python bench/gpu_memory.py --json out.json    # the figures also as JSON (bench/gpu_check.sh)

(1) ResNet-50 SSAL x3 (1000 classes, groups 200/334/500) vs the plain backbone: batch 256, 224 px,
    bf16, channels-last.
(2) MAXL on ResNet-50 (generator ResNet-10, psi 5 per class): batch 64, 224 px, bf16,
    channels-last: the multi-task step alone (generator_every 0), then with a first-order and with
    a second-order generator step after every multi-task step; ratios to the step alone.

Each case builds a fresh model and steps it through the class the trainer uses for the
method (engine.StandardTraining, maxl_training.MaxlTraining): `--warmup` steps, then `--steps`
timed ones (CUDA-synchronised; the median is reported). Peak = torch.cuda.max_memory_allocated
over the timed steps: weights, optimiser state, activations and the meta step's graphs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ssal_models
from pipeline.train.config import OptimConfig
from pipeline.train.factory import training_class
from pipeline.train.optim import build_optimizer
from ssal_models.grouping import random_grouping

NUM_CLASSES = 1000
SSAL_GROUPS = (200, 334, 500)


def method_options(method: str, extra: dict | None = None) -> dict:
    options = {}
    if method in ("ssal", "gapcat"):
        options["groupings"] = [random_grouping(NUM_CLASSES, k, seed=i) for i, k in enumerate(SSAL_GROUPS)]
    options.update(extra or {})
    return options


def measure_step(arch: str, method: str, *, batch: int, resolution: int, amp: str = "bf16", steps: int = 5,
                 warmup: int = 2, options: dict | None = None, channels_last: bool = True, device=None) -> dict:
    """``{"step_ms", "peak_gib", "weights_gib"}`` of ``method``'s training step on ``device`` (default:
    the current CUDA device; on CPU, for a smoke test, the memory figures are None)."""
    device = torch.device(device or ("cuda", torch.cuda.current_device()))
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    torch.manual_seed(0)
    model = ssal_models.build_model(arch, method, NUM_CLASSES, **method_options(method, options)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cls = training_class(method)
    cls.prepare_model(model)
    training = cls(model, model, build_optimizer(model, OptimConfig(), global_batch=batch), 0.1, device=device,
                   amp=amp, channels_last=channels_last)
    training.set_lr_factor(0.1)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    weights = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    for _ in range(warmup):
        training.step(images, labels)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss, _ = training.step(images, labels)
        sync()
        times.append(time.perf_counter() - started)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{arch} {method} {options}: non-finite loss {loss.item()}")
    result = {"step_ms": statistics.median(times) * 1e3,
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "weights_gib": weights}
    del training, model, images, labels, loss
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--ssal-batch", type=int, default=256)
    parser.add_argument("--maxl-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["ssal", "maxl"], help="one of the two tables")
    parser.add_argument("--json", help="write the figures to this file as well")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/gpu_memory.py needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    common = dict(resolution=args.resolution, amp=args.amp, steps=args.steps, warmup=args.warmup)
    print(f"{torch.cuda.get_device_name()}, {args.arch}, {args.resolution} px, {args.amp}, channels-last, "
          f"torch {torch.__version__}")
    figures: dict = {"device": torch.cuda.get_device_name(), "arch": args.arch, "resolution": args.resolution,
                     "amp": args.amp}
    if args.only in (None, "ssal"):
        rows = {m: measure_step(args.arch, m, batch=args.ssal_batch, **common) for m in ("baseline", "ssal")}
        figures["ssal3"] = {"batch": args.ssal_batch, **{m: r for m, r in rows.items()},
                            "peak_ratio": rows["ssal"]["peak_gib"] / rows["baseline"]["peak_gib"],
                            "step_ratio": rows["ssal"]["step_ms"] / rows["baseline"]["step_ms"]}
        print(f"\n(1) batch {args.ssal_batch}   step ms   peak GiB   weights+opt GiB")
        for m, r in rows.items():
            print(f"{m:9s}        {r['step_ms']:7.1f}   {r['peak_gib']:8.2f}   {r['weights_gib']:8.2f}")
        print(f"SSAL x3 / baseline: step x{figures['ssal3']['step_ratio']:.3f}, peak x{figures['ssal3']['peak_ratio']:.3f}")
    if args.only in (None, "maxl"):
        variants = {"net_step_only": {"generator_every": 0}, "first_order": {"generator_every": 1, "meta_order": "first"},
                    "second_order": {"generator_every": 1, "meta_order": "second"}}
        rows = {name: measure_step(args.arch, "maxl", batch=args.maxl_batch, options={"psi": 5, **opts}, **common)
                for name, opts in variants.items()}
        base = rows["net_step_only"]
        figures["maxl"] = {"batch": args.maxl_batch, **rows,
                           **{f"{n}_step_ratio": rows[n]["step_ms"] / base["step_ms"] for n in ("first_order", "second_order")},
                           **{f"{n}_peak_ratio": rows[n]["peak_gib"] / base["peak_gib"] for n in ("first_order", "second_order")}}
        print(f"\n(2) MAXL batch {args.maxl_batch}   step ms   peak GiB   x step   x peak")
        for name, r in rows.items():
            print(f"{name:15s}  {r['step_ms']:8.1f}   {r['peak_gib']:8.2f}   {r['step_ms'] / base['step_ms']:6.2f}   "
                  f"{r['peak_gib'] / base['peak_gib']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
