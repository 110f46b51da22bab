"""What `find_unused_parameters=True` costs a DDP step (pipeline/train/trainer.py builds DDP with it: it keeps
the first gradient buckets, so a resumed run sums the ranks' gradients in the same order as an
uninterrupted one -- bit-exact resume beyond 2 ranks, bench/slurm_scale.sh).

    .venv/bin/python bench/ddp_unused.py                          # ResNet-18/50, CPU, 1 gloo rank
    .venv/bin/python bench/ddp_unused.py --device cuda --batch 64 --res 176 --archs resnet50

Its price is a walk of the autograd graph after every forward (host time, the same on any
device), so the bench times one training step (forward, backward with the all-reduce, SGD step)
of two DDP wrappers of the same model, with and without the flag, alternating step by step
(which one goes first alternates too) in one process (a one-rank process group: the all-reduce
is a copy), and prints the median step times, their difference in ms and the ratio. A small
input (default 2 images of 32 px) makes the host-side difference visible next to the
arithmetic; on a GPU step of tens of ms the same milliseconds are the cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision


def step_time(model: nn.Module, optimizer, x, y, device) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each wrapper (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    print(f"{'arch':10} {'without ms':>11} {'with ms':>9} {'extra ms':>9} {'ratio':>6}   (median of {args.steps}, "
          f"batch {args.batch} x {args.res} px, {device})")
    for arch in args.archs:
        wrappers = []
        for unused in (False, True):
            net = torchvision.models.get_model(arch, num_classes=100).to(device)
            ddp = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index or 0] if device.type == "cuda" else None,
                find_unused_parameters=unused, broadcast_buffers=False)
            wrappers.append((ddp, torch.optim.SGD(ddp.parameters(), lr=0.01)))
        x = torch.randn(args.batch, 3, args.res, args.res, device=device)
        y = torch.randint(0, 100, (args.batch,), device=device)
        times = ([], [])
        for i in range(args.warmup + args.steps):
            for which in ((0, 1) if i % 2 else (1, 0)):  # who goes first alternates: no order bias
                ddp, opt = wrappers[which]
                t = step_time(ddp, opt, x, y, device)
                if i >= args.warmup:
                    times[which].append(t)
        without, with_ = (1e3 * statistics.median(t) for t in times)
        print(f"{arch:10} {without:11.2f} {with_:9.2f} {with_ - without:9.2f} {with_ / without:6.3f}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
