"""What an epoch's checkpoint costs at ResNet-152 scale: main's code path vs this checkout's, side by side in one run.

    .venv/bin/python bench/checkpoint_cost.py                  # ResNet-152 DKS, 1000 classes, CPU, 3 rounds
    .venv/bin/python bench/checkpoint_cost.py --ref HEAD~3 --dir /scratch --json out.json

The state is what the trainer saves: the model's state_dict, SGD's momentum buffers (one per parameter), the
RNG states and the counters. Two cases, each timed for both code paths in every round (interleaved: machine
load drifts hit both alike; the median over the rounds is reported):

- "best and last": an epoch that is both the best so far and a checkpoint epoch. Before: ``save_checkpoint``
  of `--ref` (``git show REF:pipeline/train/checkpoint.py``, imported here) called for best.pt, then last.pt.
  After: this checkout's ``save_checkpoint(state, best.pt, also=[last.pt])``: one file, one hard link.
- "last only": one last.pt, before vs after (the same work on CPU: the CPU copy is the tensors themselves).

Bytes: the sizes of the distinct files (inodes) the case leaves in its folder. Wall time includes fsync: it
depends on the disk under ``--dir`` (default: the system's temporary folder).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ssal_models
from pipeline.train import checkpoint as current
from pipeline.train.config import REPO_ROOT

NUM_CLASSES = 1000


def reference_module(ref: str):
    """pipeline/train/checkpoint.py as it is at git `ref`, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:pipeline/train/checkpoint.py"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="checkpoint-ref-"))
    path = folder / "checkpoint_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("checkpoint_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.rmtree(folder)
    return module


def training_state(arch: str, method: str) -> dict:
    """The trainer's checkpoint content for `arch` + `method`, momentum buffers filled."""
    torch.manual_seed(0)
    model = ssal_models.build_model(arch, method, NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
    return {"model": model.state_dict(), "ema": None, "training": {"optimizer": optimizer.state_dict()},
            "epoch": 1, "step_in_epoch": 0, "global_step": 5004, "history": {}, "rng": current.rng_state()}


def bytes_on_disk(folder: Path) -> int:
    inodes = {path.stat().st_ino: path.stat().st_size for path in folder.iterdir()}
    return sum(inodes.values())


def timed(save, folder: Path) -> tuple[float, int]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    save(folder)
    return time.perf_counter() - started, bytes_on_disk(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--method", default="dks")
    parser.add_argument("--ref", default="main", help="git ref of the code path 'before' (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files are written (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures to this file as well")
    args = parser.parse_args(argv)
    before = reference_module(args.ref)
    state = training_state(args.arch, args.method)
    params = sum(t.numel() for t in state["model"].values())
    cases = {
        "best and last": {
            "before": lambda d: (before.save_checkpoint(state, d / current.BEST),
                                 before.save_checkpoint(state, d / current.LAST)),
            "after": lambda d: current.save_checkpoint(state, d / current.BEST, also=[d / current.LAST])},
        "last only": {
            "before": lambda d: before.save_checkpoint(state, d / current.LAST),
            "after": lambda d: current.save_checkpoint(state, d / current.LAST)},
    }
    work = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.dir))
    samples = {case: {path: [] for path in paths} for case, paths in cases.items()}
    sizes = {}
    try:
        for _ in range(args.rounds):
            for case, paths in cases.items():
                for path, save in paths.items():
                    seconds, size = timed(save, work / "case")
                    samples[case][path].append(seconds)
                    sizes[(case, path)] = size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.arch} {args.method}: {params / 1e6:.1f} M values in the state_dict; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; before = {args.ref}, after = this checkout; median of {args.rounds}")
    print(f"{'case':14s} {'before s':>9s} {'after s':>8s} {'ratio':>6s} {'before MB':>10s} {'after MB':>9s}")
    figures = {"arch": args.arch, "method": args.method, "ref": args.ref, "rounds": args.rounds, "cases": {}}
    for case in cases:
        old, new = (statistics.median(samples[case][p]) for p in ("before", "after"))
        old_bytes, new_bytes = sizes[(case, "before")], sizes[(case, "after")]
        figures["cases"][case] = {"before_s": old, "after_s": new, "time_ratio": new / old,
                                  "before_bytes": old_bytes, "after_bytes": new_bytes}
        print(f"{case:14s} {old:9.2f} {new:8.2f} {new / old:6.2f} {old_bytes / 1e6:10.1f} {new_bytes / 1e6:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
