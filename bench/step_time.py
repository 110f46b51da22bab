"""Steady-state training step time of this tree against an earlier revision, side by side in one run.

    .venv/bin/python bench/step_time.py                      # against main's 2d5553e, 3 alternations
    .venv/bin/python bench/step_time.py --before HEAD~3 --alternations 5 --steps 24

The revision is checked out into a temporary ``git worktree``. Each run is the real training command,
``torchrun --nproc_per_node 2 -m pipeline.train`` (gloo, CPU) with the demo config (ResNet-18, SSAL, 32 px),
started in one tree or the other, alternating (which tree goes first alternates too) so that the box's
load falls on both alike. The time of a step is the trainer's own: the last epoch's ``train/epoch_seconds``
(the training loop with its data loading, flags, BN averaging and DDP; the first epoch, which holds the
warm-up, is not used) divided by its steps, read from the run's ``last.pt``. Prints every run and the
median ms/step of each variant with its ratio to the revision's.

Variants of this tree: ``train.deterministic`` false (the GPU recipes' mode: DDP without
find_unused_parameters, BN statistics averaged when read) and true (the demo config's default: both per
step, as before, for a bit-exact resume). Both trees read one demo data set, written once to a temporary
folder; the data package (``ssal_datasets``) is this tree's in both (the installed one).
On CPU a host-device synchronisation costs nothing: what this measures is the host work and the
collectives that a step no longer does; the GPU's gain from the syncs removed comes on top.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_once(tree: Path, work: Path, data: Path, steps: int, epochs: int, extra: list[str]) -> float:
    """ms per step of the last epoch of one 2-process training run in `tree`."""
    out = work / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", "--config", "configs/demo.yaml", f"data.root={data}", f"output_dir={out}",
           f"runs_root={work / 'runs'}", "tracking.enabled=false", f"schedule.epochs={epochs}",
           f"train.max_steps_per_epoch={steps}", "train.threads=1", "data.num_workers=1",
           f"train.log_every={10 * steps}", "eval.every_n_epochs=1000", *extra]
    result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} in {tree} failed:\n{result.stderr[-3000:]}")
    history = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["history"]
    seconds = history["train/epoch_seconds"][-1][1]
    shutil.rmtree(work)
    return 1000 * seconds / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--before", default="2d5553e", help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--alternations", type=int, default=3, help="runs of each variant (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="steps per epoch (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last one is timed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.alternations < 1 or args.steps < 1 or args.epochs < 2:
        print("error: --alternations and --steps must be >= 1, --epochs >= 2 (the first is warm-up)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        added = subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO,
                               capture_output=True, text=True)
        if added.returncode != 0:
            print(f"error: --before {args.before}: {added.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            variants = {f"before {args.before}": (before, []),
                        "after, deterministic false": (REPO, ["train.deterministic=false"]),
                        "after, deterministic true": (REPO, ["train.deterministic=true"])}
            times: dict[str, list[float]] = {name: [] for name in variants}
            data = tmp / "demo"
            for alternation in range(args.alternations):
                order = list(variants) if alternation % 2 == 0 else list(reversed(variants))
                for name in order:
                    tree, extra = variants[name]
                    ms = run_once(tree, tmp / "work", data, args.steps, args.epochs, extra)
                    times[name].append(ms)
                    print(f"run {alternation + 1}/{args.alternations}  {name:30} {ms:8.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    reference = statistics.median(times[f"before {args.before}"])
    print(f"\nmedian ms/step over {args.alternations} runs (2 gloo processes, ResNet-18 demo, batch 64 per process, "
          f"32 px, {args.steps} steps/epoch, epoch {args.epochs} timed)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:30} {median:8.1f}   ratio to before {median / reference:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
