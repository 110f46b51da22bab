"""MAXL's collapse finding on the demo set: the fraction of auxiliary classes the label generator
actually uses ("Label %", supplementary Table 2) with the entropy term (lambda = 0.2) and
without it (lambda = 0).

    .venv/bin/python bench/maxl_entropy.py                       # configs/demo_maxl.yaml as is
    .venv/bin/python bench/maxl_entropy.py --lambdas 0.2 0 -- schedule.epochs=2 method.options.generator_lr=0.1

Runs ``python -m pipeline.train`` once per lambda, one after the other, with the given config
(default: the real ``configs/demo_maxl.yaml``; the demo set is written on first use) and extra
``key=value`` overrides after ``--``; each run gets its own run dir under ``--work``.  Reads
each run's per-epoch metrics from its checkpoint history and prints one table: per epoch, the
used-label fraction of each lambda (counted over the epoch's training samples), and at the end
the entropy term, the validation top-1 of the main head and the auxiliary accuracy.  Minutes on
a CPU per lambda (``configs/demo_maxl.yaml``: 2 epochs of 40 steps); not part of the tests.

Measured (2 shared CPU cores, seed 0; "Label %" of the last epoch's 2560 training samples,
160 auxiliary classes; 0.88 already at the random initialisation), with the config as it was
before 2026-12-01 (the primary task on the 32 classes, psi 5, generator lr 1e-2, collapse
estimate ``batch``; today's trains on the 8 super-classes, see its header):

    configs/demo_maxl.yaml (generator lr 1e-2)     lambda=0.2: 0.887   lambda=0: 0.869
    same, method.options.generator_lr=0.1          lambda=0.2: 0.956   lambda=0: 0.900
      (per epoch 0.881 0.919 0.931 0.956 vs 0.875 0.875 0.894 0.900; val top-1 0.558 vs 0.561)

The entropy term raises the used fraction, as in supplementary Table 2; with ~80 generator
steps the generator moves little, so the gap is small at the demo's lr and grows with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(config: str, lam: float, work: Path, overrides: list[str]) -> dict:
    out = work / f"lambda_{lam:g}"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", config,
           f"method.options.entropy_weight={lam}", f"output_dir={out}", f"runs_root={work / 'runs'}",
           "tracking.experiment=bench-maxl-entropy", f"tracking.run_name=lambda_{lam:g}", *overrides]
    resume = ["--resume", "auto"] if (out / "last.pt").is_file() else []
    started = time.perf_counter()
    subprocess.run(cmd[:3] + resume + cmd[3:], cwd=REPO, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    labels = json.loads((out / "maxl_label_distribution.json").read_text())
    return {"history": state["history"], "labels": labels, "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_maxl.yaml")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 0.0])
    parser.add_argument("--work", default="runs/bench_maxl_entropy", help="run dirs (re-running resumes/reuses)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides (after --)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    results = {lam: run(args.config, lam, work, args.overrides) for lam in args.lambdas}

    def series(lam, key):
        return dict(results[lam]["history"].get(key, []))

    epochs = sorted(series(args.lambdas[0], "train/label_fraction"))
    print(f"\nused-label fraction per epoch ({args.config} {' '.join(args.overrides)})")
    print("epoch  " + "  ".join(f"lambda={lam:<5g}" for lam in args.lambdas))
    for e in epochs:
        print(f"{e:>5}  " + "  ".join(f"{series(lam, 'train/label_fraction').get(e, float('nan')):>12.3f}"
                                      for lam in args.lambdas))
    print("\nlast epoch               " + "  ".join(f"lambda={lam:<5g}" for lam in args.lambdas))
    for key in ("train/label_fraction", "train/label_entropy_frac", "train/label_max_prob", "train/entropy_term",
                "train/entropy_estimate", "train/aux_acc", "train/meta_loss", "val/top1/main", "val/aux_acc"):
        print(f"{key:<24} " + "  ".join(f"{series(lam, key).get(epochs[-1], float('nan')):>12.4f}"
                                        for lam in args.lambdas))
    print("wall seconds             " + "  ".join(f"{results[lam]['seconds']:>12.0f}" for lam in args.lambdas))
    return 0


if __name__ == "__main__":
    sys.exit(main())
