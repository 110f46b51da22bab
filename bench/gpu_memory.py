"""Peak GPU memory and time of the engine's training step, measured side by side in one run.

    .venv/bin/python bench/gpu_memory.py                    # GPU: both tables below
    .venv/bin/python bench/gpu_memory.py --json out.json    # the figures also as JSON (bench/gpu_check.sh)
    .venv/bin/python bench/gpu_memory.py --estimate configs/imagenet/*.yaml   # no GPU: each recipe's estimate

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
from pipeline.train.factory import method_training_class
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
    cls = method_training_class(method)
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


# bytes per parameter that do not scale with the batch: fp32 weights, gradients, SGD momentum and DDP's gradient
# buckets (4 each), autocast's bf16 weight copies (2)
BYTES_PER_PARAMETER = 18
PROBE_RESOLUTION = 64  # every feature map of a ResNet scales with the image's area (sizes divisible by 32)
# the share of the GPU the estimate may fill: the saved activations leave out backward's gradient buffers, cuDNN's
# workspaces and the allocator's fragmentation (calibration: FFCV trains ResNet-50 at 512 x 192 px on a 40 GB A100,
# where this estimate says 17 GiB, i.e. 43 %)
HEADROOM = 0.5


def saved_activation_bytes(arch: str, method: str, *, batch: int, options: dict | None = None,
                           blurpool: bool = False) -> tuple[int, int]:
    """(bytes of the tensors autograd saves for backward, parameters) in one training step of `method` on CPU
    under bf16 autocast at PROBE_RESOLUTION px: distinct storages, the parameters' own left out. Every graph
    of the step counts (MAXL's meta step adds its graphs to the multi-task step's: an upper bound)."""
    torch.manual_seed(0)
    model = ssal_models.build_model(arch, method, NUM_CLASSES, blurpool=blurpool, **method_options(method, options))
    cls = method_training_class(method)
    cls.prepare_model(model)
    training = cls(model, model, build_optimizer(model, OptimConfig(), global_batch=batch), 0.1,
                   device=torch.device("cpu"), amp="bf16", channels_last=False)
    training.set_lr_factor(0.1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.randn(batch, 3, PROBE_RESOLUTION, PROBE_RESOLUTION)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training.step(images, labels)
    return sum(storages.values()), sum(p.numel() for p in model.parameters())


def estimate_peak_gib(arch: str, method: str, *, batch: int, resolution: int, options: dict | None = None,
                      blurpool: bool = False) -> dict:
    """Peak GPU memory of a training step at `batch` x `resolution` px, estimated on CPU: BYTES_PER_PARAMETER per
    parameter + the saved activations, measured at batch 1 and 2 (the difference is one image's, the rest is
    what does not grow with the batch: autocast's weight copies) and scaled by the area to `resolution`."""
    one, params = saved_activation_bytes(arch, method, batch=1, options=options, blurpool=blurpool)
    two, _ = saved_activation_bytes(arch, method, batch=2, options=options, blurpool=blurpool)
    per_image = (two - one) * (resolution / PROBE_RESOLUTION) ** 2
    fixed = params * BYTES_PER_PARAMETER + max(0, 2 * one - two)
    return {"params_m": params / 1e6, "per_image_mib": per_image / 2**20, "fixed_gib": fixed / 2**30,
            "peak_gib": (fixed + batch * per_image) / 2**30}


def estimate_recipes(paths: list[str], gpu_gib: float) -> dict:
    """The estimate for each recipe (its arch, method, per-GPU batch, top training resolution), against a GPU's
    memory: the share it would use, and the largest batch whose estimate fills at most HEADROOM of it."""
    from pipeline.train.config import load_config

    rows = {}
    for path in paths:
        cfg = load_config(path, ["method.groups_file="])  # SSAL: random groupings of the paper's sizes (below)
        options = {k: v for k, v in cfg.method.options.items() if cfg.method.name == "maxl"}
        if cfg.method.name == "maxl":
            options["generator_every"] = 1  # the step with a meta step: the largest
        estimate = estimate_peak_gib(cfg.model.arch, cfg.method.name, batch=cfg.data.batch_size,
                                     resolution=cfg.data.max_res, options=options, blurpool=cfg.model.blurpool)
        room = HEADROOM * gpu_gib - estimate["fixed_gib"]
        estimate.update(batch=cfg.data.batch_size, resolution=cfg.data.max_res, share=estimate["peak_gib"] / gpu_gib,
                        max_batch=int(room * 2**30 // (estimate["per_image_mib"] * 2**20)))
        rows[path] = estimate
        print(f"{path:45s} {cfg.model.arch:9s} {cfg.method.name:8s} {cfg.data.batch_size:5d} {cfg.data.max_res:4d} "
              f"{estimate['params_m']:7.1f} {estimate['per_image_mib']:8.1f} {estimate['peak_gib']:7.1f} "
              f"{100 * estimate['share']:5.0f}% {estimate['max_batch']:6d}", flush=True)
    return rows


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
    parser.add_argument("--estimate", nargs="+", metavar="RECIPE.yaml",
                        help="no GPU needed: estimate each recipe's peak memory on CPU (see estimate_peak_gib)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU's memory for --estimate (H100: 80)")
    args = parser.parse_args(argv)
    if args.estimate:
        print(f"peak = {BYTES_PER_PARAMETER} B/param + batch x saved activations per image (bf16 autocast, counted on "
              f"CPU at {PROBE_RESOLUTION} px, scaled by area); GPU {args.gpu_gib:g} GiB")
        print(f"{'recipe':45s} {'arch':9s} {'method':8s} {'batch':>5s} {'res':>4s} {'Mparam':>7s} {'MiB/img':>8s} "
              f"{'GiB':>7s} {'share':>6s} {'max b':>6s}")
        rows = estimate_recipes(args.estimate, args.gpu_gib)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return 0
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
