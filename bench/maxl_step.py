"""What MAXL's generator (meta) step costs next to its multi-task step: time and peak GPU memory
of the second-order and the first-order (finite-difference) meta step, measured side by side in
one run, as ratios to the multi-task step.

    .venv/bin/python bench/maxl_step.py --device cuda              # ResNet-50, batch 64, 224 px, bf16
    .venv/bin/python bench/maxl_step.py --device cpu --arch resnet18 --batch 4 --resolution 32 --classes 10

The model is the pipeline's (``ssal_models.build_model(arch, "maxl", classes, psi=5)``: the
auxiliary head on ``layer4`` and the ResNet-10 label generator), with ImageNet's 1000 classes
by default; on a GPU channels-last and autocast (``--amp bf16``). Steps, on one random batch:

* ``multitask``: forward (the generator's labels under no_grad) + focal losses + backward +
  SGD step (momentum 0.9) of the multi-task net -- what every training iteration does;
* ``meta_second``: ``method.generator_step`` with ``meta_order=second`` (virtual SGD step with
  ``create_graph``, second forward at theta+, double backward into the generator);
* ``meta_first``: the same with ``meta_order=first`` (two extra forward/backward pairs instead
  of the double backward).

Timings are interleaved (multitask, meta_second, meta_first, then again) and the median is
reported; on a GPU with CUDA synchronisation, peak memory per kind from
``torch.cuda.max_memory_allocated`` after a reset (the model, optimiser and batch included).
``--json PATH`` also writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ssal_models  # noqa: E402
from ssal_models import maxl as mx  # noqa: E402

KINDS = ("multitask", "meta_second", "meta_first")


def build(args, device):
    torch.manual_seed(0)
    model = ssal_models.build_model(args.arch, "maxl", args.classes, psi=args.psi).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(mx.multitask_parameters(model), lr=0.1, momentum=0.9, weight_decay=5e-5)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    return model, opt, x, y


def make_steps(model, opt, x, y, autocast):
    method = model.method

    def multitask():
        with autocast():
            total, _ = method.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    def meta(order):
        def step():
            method.meta_order = order
            with autocast():
                stats = method.generator_step(model, x, y, net_optimizer=opt, accumulate=False)
            if not bool(stats["finite"]):
                raise RuntimeError(f"non-finite {order}-order meta-gradient")
            for p in mx.generator_parameters(model):
                p.grad = None
        return step

    return {"multitask": multitask, "meta_second": meta("second"), "meta_first": meta("first")}


def measure(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, opt, x, y = build(args, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = ((lambda: torch.autocast("cuda", dtype=dtype)) if device.type == "cuda" and dtype is not None
                else nullcontext)
    steps = make_steps(model, opt, x, y, autocast)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for kind in KINDS:  # warm-up (cuDNN autotuning, allocator)
        for _ in range(args.warmup):
            steps[kind]()
    sync()
    times = {k: [] for k in KINDS}
    peaks = {}
    for _ in range(args.repeats):
        for kind in KINDS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            steps[kind]()
            sync()
            times[kind].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[kind] = max(peaks.get(kind, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    base = statistics.median(times["multitask"])
    result = {"arch": args.arch, "batch": args.batch, "resolution": args.resolution, "classes": args.classes,
              "psi": args.psi, "device": str(device), "amp": args.amp if device.type == "cuda" else "none",
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "kinds": {}}
    for kind in KINDS:
        t = statistics.median(times[kind])
        row = {"ms": 1000 * t, "time_ratio": t / base}
        if peaks:
            row["peak_gib"] = peaks[kind]
            row["memory_ratio"] = peaks[kind] / peaks["multitask"]
        result["kinds"][kind] = row
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--psi", type=int, default=5, help="auxiliary classes per class")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="GPU autocast dtype")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args)
    print(f"MAXL step cost: {result['arch']}, batch {result['batch']}, {result['resolution']} px, "
          f"{result['classes']} classes x psi {result['psi']}, {result['device']} {result['gpu'] or ''} "
          f"amp {result['amp']}")
    print(f"{'step':<12} {'ms':>9} {'x multitask':>12} {'peak GiB':>9} {'x memory':>9}")
    for kind, row in result["kinds"].items():
        mem = (f"{row['peak_gib']:>9.2f} {row['memory_ratio']:>9.2f}" if "peak_gib" in row
               else f"{'n/a':>9} {'n/a':>9}")
        print(f"{kind:<12} {row['ms']:>9.1f} {row['time_ratio']:>12.2f} {mem}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
