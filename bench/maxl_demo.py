"""MAXL on the demo set against the baseline at equal epochs and seeds: do the generated labels end
peaked and varied, and does the main head keep (or beat) the baseline's accuracy? Not a test.

    .venv/bin/python bench/maxl_demo.py                          # configs/demo_maxl.yaml, seeds 0 1 2, 2 runs at a time
    .venv/bin/python bench/maxl_demo.py --seeds 0 --jobs 1 -- schedule.epochs=2

For every seed, two runs of ``python -m pipeline.train``: the config as is (MAXL), and the same
config with ``method: {name: baseline}`` (same data, optimiser, schedule, epochs; the baseline's
cross-entropy instead of MAXL's focal losses), each with ``train.seed=S``, one CPU thread, its own
run dir under ``--work`` (re-running reuses finished runs and resumes interrupted ones). Reads
each run's per-epoch history from its checkpoint and prints, per seed and as mean +- std: the
untrained generator's labels (step 0) and the last epoch's ``train/label_entropy_frac``,
``train/label_max_prob``, ``train/label_fraction``, the MAXL and baseline ``val/top1/main``.
Targets (issue 16): final label_entropy_frac <= 0.7, label_fraction >= 0.8, MAXL top-1 >=
baseline top-1 within noise (difference of the means >= -2 standard errors of that difference).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LABEL_KEYS = ("train/label_entropy_frac", "train/label_max_prob", "train/label_fraction",
              "train/label_marginal_entropy_frac")


def baseline_config(config: Path, out: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    data["method"] = {"name": "baseline"}
    data.setdefault("tracking", {})["experiment"] = "bench-maxl-demo"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def command(config: Path, run_dir: Path, name: str, seed: int, work: Path, overrides: list[str]) -> list[str]:
    resume = ["--resume", "auto"] if (run_dir / "last.pt").is_file() else []
    return [sys.executable, "-m", "pipeline.train", "--config", str(config), *resume, f"train.seed={seed}",
            "train.threads=1", f"output_dir={run_dir}", f"runs_root={work / 'runs'}",
            "tracking.experiment=bench-maxl-demo", f"tracking.run_name={name}", *overrides]


def history(run_dir: Path) -> dict:
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    return {k: dict(v) for k, v in state["history"].items()}


def planted_agreement(run_dir: Path) -> float | None:
    """With ``data.labels: superclass`` on the demo set: how well the trained generator's labels
    (argmax) recover the planted classes inside each super-class on the val split -- the adjusted
    Rand index per super-class, averaged (0: chance, 1: the classes exactly); None otherwise."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from pipeline.stages.common import load_trained, run_dataset
    from pipeline.train.factory import label_space
    from ssal_datasets import loader as data_loader

    cfg, model, _, _ = load_trained(None, None, run_dir, run_dir)
    if cfg.method.name != "maxl" or cfg.data.labels != "superclass":
        return None
    root, manifest = run_dataset(cfg, "planted_agreement needs the demo set")
    _, _, table = label_space(cfg, manifest)
    loader = data_loader.create_val_loader(root / manifest["splits"]["val"]["beton"], batch_size=256, num_workers=1,
                                           resolution=cfg.data.val_res, device="cpu", distributed=False,
                                           channels_last=False)
    classes, generated = [], []
    with torch.no_grad():
        for images, labels in loader:
            generated.append(model.method.generator.log_probs(images, table[labels]).argmax(-1))
            classes.append(labels.clone())
    loader.close()
    classes, generated = torch.cat(classes).numpy(), torch.cat(generated).numpy()
    superclass = table.numpy()[classes]
    return float(np.mean([adjusted_rand_score(classes[superclass == s], generated[superclass == s])
                          for s in np.unique(superclass)]))


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_maxl.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    parser.add_argument("--work", default="runs/bench_maxl_demo", help="run dirs (default: %(default)s)")
    parser.add_argument("overrides", nargs="*",
                        help="extra key=value overrides for every run (after --); method.* ones for MAXL's only")
    args = parser.parse_args(argv)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = (REPO / args.config).resolve()
    if not config.is_file():
        print(f"error: --config: no such file {args.config}", file=sys.stderr)
        return 2
    configs = {"maxl": config, "baseline": baseline_config(config, work / "baseline.yaml")}
    epochs = int(yaml.safe_load(config.read_text()).get("schedule", {}).get("epochs", 4))
    for o in args.overrides:
        if o.startswith("schedule.epochs="):
            epochs = int(o.split("=", 1)[1])
    queue = []
    for seed in args.seeds:
        for kind in ("maxl", "baseline"):
            run_dir = work / f"{kind}_seed{seed}"
            done = (run_dir / "last.pt").is_file() and epochs in history(run_dir).get("val/top1/main", {})
            if not done:
                name = f"{kind}_seed{seed}"
                # method.* overrides are MAXL's (the baseline has no such options)
                overrides = [o for o in args.overrides if kind == "maxl" or not o.startswith("method.")]
                queue.append((name, command(configs[kind], run_dir, name, seed, work, overrides)))
    started = time.perf_counter()
    running: list[tuple[subprocess.Popen, list[str]]] = []  # at most --jobs processes
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    failed = 0
    while queue or running:
        while queue and len(running) < args.jobs:
            name, cmd = queue.pop(0)
            log = open(work / f"{name}.log", "a")
            running.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), cmd))
            log.close()
        time.sleep(5)
        for proc, cmd in list(running):
            if proc.poll() is not None:
                running.remove((proc, cmd))
                if proc.returncode != 0:
                    failed += 1
                    print(f"failed (rc {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
    rows = {}
    for seed in args.seeds:
        rows[seed] = {kind: history(work / f"{kind}_seed{seed}") for kind in ("maxl", "baseline")
                      if (work / f"{kind}_seed{seed}" / "last.pt").is_file()}

    def values(kind, key, epoch):
        return [rows[s][kind][key][epoch] for s in args.seeds
                if kind in rows[s] and epoch in rows[s][kind].get(key, {})]

    print(f"\n{args.config} {' '.join(args.overrides)}: {epochs} epochs, seeds {args.seeds} "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"{'':<34} {'untrained (step 0)':>20} {'last epoch':>20}   per seed (last)")
    for key in LABEL_KEYS:
        last = values("maxl", key, epochs)
        print(f"{key:<34} {mean_std(values('maxl', key, 0)):>20} {mean_std(last):>20}   "
              + ", ".join(f"{v:.3f}" for v in last))
    agreement = [a for a in (planted_agreement(work / f"maxl_seed{s}") for s in args.seeds
                             if (work / f"maxl_seed{s}" / "final_weights.pt").is_file()) if a is not None]
    if agreement:
        print(f"{'planted classes (ARI, val)':<34} {'':>20} {mean_std(agreement):>20}   "
              + ", ".join(f"{v:.3f}" for v in agreement))
    top = {kind: values(kind, "val/top1/main", epochs) for kind in ("maxl", "baseline")}
    for kind in ("maxl", "baseline"):
        print(f"{'val/top1/main ' + kind:<34} {'':>20} {mean_std(top[kind]):>20}   "
              + ", ".join(f"{v:.3f}" for v in top[kind]))
    frac, used = values("maxl", "train/label_entropy_frac", epochs), values("maxl", "train/label_fraction", epochs)
    if len(top["maxl"]) > 1 and len(top["baseline"]) > 1:
        diff = statistics.mean(top["maxl"]) - statistics.mean(top["baseline"])
        se = math.sqrt(statistics.variance(top["maxl"]) / len(top["maxl"])
                       + statistics.variance(top["baseline"]) / len(top["baseline"]))
        print(f"\nMAXL - baseline val top-1: {100 * diff:+.2f} pp (standard error {100 * se:.2f} pp): "
              f"{'met' if diff >= -2 * se else 'NOT met'} (>= baseline within noise)")
    if frac and used:
        print(f"label_entropy_frac {statistics.mean(frac):.3f} (target <= 0.7): "
              f"{'met' if statistics.mean(frac) <= 0.7 else 'NOT met'}; label_fraction {statistics.mean(used):.3f} "
              f"(target >= 0.8): {'met' if statistics.mean(used) >= 0.8 else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
