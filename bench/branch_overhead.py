"""What the auxiliary branches cost: step time, FLOPs and parameters of every method relative
to the plain backbone, measured side by side in one run.

    .venv/bin/python bench/branch_overhead.py                    # CPU: 112 px, batch 8, fp32, 1 thread
    .venv/bin/python bench/branch_overhead.py --device cuda      # GPU: 224 px, batch 64, AMP + channels-last
    .venv/bin/python bench/branch_overhead.py --head authors     # SSAL / GapCat with the authors' heads

For each arch, every method is built with ImageNet's 1000 classes (SSAL / GapCat: three
branches after layer1..3 with 200 / 334 / 500 groups, the paper's layout); a *step* is one
training forward + loss + backward (no optimiser update) on the same random batch.  Timings
are interleaved (method A, B, C, ..., then again) and the median is reported, so that machine
load drifts hit every method alike.  On CPU the clock is by default the process's CPU time
with one thread (``--clock cpu --threads 1``): on a machine shared with other jobs, wall time
measures the neighbours' load more than the step, while single-thread CPU time measures the
work (``--clock wall`` for wall time).  On a GPU it is wall time with CUDA synchronisation.  FLOPs are counted with ``torch.utils.flop_counter`` on the
meta device (convolutions and matmuls of forward + backward; BN and elementwise ops are not
counted), once at 224 px for the table and once at the timing resolution for the ratio.

Targets (issue 7): SSAL x3 on ResNet-50 <= 1.20x the backbone's step time; for every method,
step-time ratio / FLOPs ratio <= 1.10 (branches as efficient as the backbone).
``--json FILE`` writes the rows (and the run's settings) as well (bench/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import ssal_models
from ssal_models.grouping import random_grouping

NUM_CLASSES = 1000
SSAL_GROUPS = (200, 334, 500)


def method_options(method: str, head: str = "light") -> dict:
    if method in ("ssal", "gapcat"):
        return {"groupings": [random_grouping(NUM_CLASSES, k, seed=i) for i, k in enumerate(SSAL_GROUPS)],
                "head": head}
    return {}


def count_flops(arch: str, method: str, resolution: int, head: str = "light") -> int:
    """Forward + backward FLOPs of one image (meta device: shapes only, no compute); counted on two
    images, as training-mode BN refuses one value per channel (1 x 1 maps at small resolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = ssal_models.build_model(arch, method, NUM_CLASSES, **method_options(method, head))
        x = torch.empty(2, 3, resolution, resolution)
        targets = torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.method.loss(model(x), targets)
        loss.backward()
    return counter.get_total_flops() // 2


def make_step(model, x, targets, autocast):
    def step():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = model.method.loss(model(x), targets)
        loss.backward()
    return step


def time_steps(steps: dict, device: torch.device, warmup: int, repeats: int, clock: str) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = time.process_time if clock == "cpu" else time.perf_counter
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = now()
            step()
            sync()
            times[name].append(now() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_arch(arch: str, methods: list, args, device: torch.device) -> list:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    targets = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if args.amp == "none":
        autocast = nullcontext
    else:
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    models, steps = {}, {}
    for method in methods:
        model = ssal_models.build_model(arch, method, NUM_CLASSES, **method_options(method, args.head))
        model = model.to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[method] = model
        steps[method] = make_step(model, x, targets, autocast)
    seconds = time_steps(steps, device, args.warmup, args.repeats, args.clock)
    rows = []
    base = methods[0]
    flops224 = {m: count_flops(arch, m, 224, args.head) for m in methods}
    flops_res = {m: count_flops(arch, m, args.resolution, args.head) for m in methods}
    params = {m: ssal_models.count_parameters(models[m])["total"] for m in methods}
    for method in methods:
        step_ratio = seconds[method] / seconds[base]
        flops_ratio = flops_res[method] / flops_res[base]
        rows.append({
            "arch": arch, "method": method, "params_M": params[method] / 1e6,
            "params_ratio": params[method] / params[base], "gflops224": flops224[method] / 1e9,
            "flops_ratio": flops_ratio, "step_ms": seconds[method] * 1e3, "step_ratio": step_ratio,
            "step_over_flops": step_ratio / flops_ratio,
        })
    return rows


def print_table(rows: list, args, device: torch.device) -> None:
    print(f"device={device.type} resolution={args.resolution} batch={args.batch} amp={args.amp} "
          f"channels_last={args.channels_last} threads={torch.get_num_threads()} "
          f"clock={args.clock} repeats={args.repeats} (median) ssal/gapcat head={args.head} torch={torch.__version__}")
    header = ("arch", "method", "params M", "params x", "GFLOPs/img@224 f+b", f"FLOPs x@{args.resolution}",
              "step ms", "step x", "step x / FLOPs x")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print(f"| {r['arch']} | {r['method']} | {r['params_M']:.1f} | {r['params_ratio']:.2f} | {r['gflops224']:.1f} | "
              f"{r['flops_ratio']:.2f} | {r['step_ms']:.0f} | {r['step_ratio']:.2f} | {r['step_over_flops']:.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=["baseline", "ssal", "gapcat", "dks", "ds"],
                        help="the first one is the reference of the ratios")
    parser.add_argument("--head", choices=["light", "authors"], default="light",
                        help="SSAL / GapCat branch heads (method option head)")
    parser.add_argument("--resolution", type=int, help="default: 112 on CPU, 224 on GPU")
    parser.add_argument("--batch", type=int, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], help="default: none on CPU, bf16 on GPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: off on CPU, on on GPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads; default 1 with --clock cpu, else 2")
    parser.add_argument("--clock", choices=["cpu", "wall"],
                        help="cpu: process CPU time (CPU default), wall: elapsed time (GPU default)")
    parser.add_argument("--json", help="write the rows (and the run's settings) to this file as well")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.resolution = args.resolution or (224 if gpu else 112)
    args.batch = args.batch or (64 if gpu else 8)
    args.amp = args.amp or ("bf16" if gpu else "none")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.clock = args.clock or ("wall" if gpu else "cpu")
    if gpu and args.clock == "cpu":
        parser.error("--clock cpu measures host time only; use --clock wall on a GPU")
    args.threads = args.threads or (1 if args.clock == "cpu" else 2)
    if gpu:
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for arch in args.archs:
        rows += run_arch(arch, args.methods, args, device)
    print_table(rows, args, device)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        if gpu:
            settings["device_name"] = torch.cuda.get_device_name()
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
