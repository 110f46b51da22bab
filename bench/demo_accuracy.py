"""Accuracy benchmark on the demo set: baseline vs SSAL x1 / x3 (main = +TR, joint = +JP, +LC) vs DKS
vs DS, at equal epochs and seeds; mean +- std over seeds. Not a test.

    python bench/demo_accuracy.py                       # 3 seeds x 8 epochs on data/demo (written if missing)
    python bench/demo_accuracy.py --seeds 0 --epochs 4  # a quick partial run

Each seed is one run of a study (the chain of studies/demo.yaml without GapCat / CAMs) in its own
store under ``--runs-root/seed<S>``, so an interrupted benchmark resumes where it stopped. Every
training stage uses ``train.seed=S`` and the same held-out 10 % of train (the groups' confusion).
Target (issue 5): SSAL joint >= baseline + 2 pp.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import yaml

STUDY = {
    "study": "demo_accuracy",
    "experiment": "demo-accuracy",
    "base": {"config": "configs/demo.yaml", "overrides": {"eval.holdout_fraction": 0.1}},
    "report": False,
    "stages": {
        "baseline": {"overrides": {"method.name": "baseline"}},
        "groups": {"kind": "groups", "from": "baseline", "k": [8], "criterion": "join"},
        "groups3": {"kind": "groups", "from": "baseline", "k": [4, 8, 16], "criterion": "join"},
        "ssal1": {"overrides": {"method.name": "ssal", "method.groups_file": "${groups}",
                                "method.options": {"stages": ["layer3"], "eta": 1.0}}},
        "ssal3": {"overrides": {"method.name": "ssal", "method.groups_file": "${groups3}",
                                "method.options": {"eta": 0.3}}},
        "lc": {"kind": "lc", "from": "ssal3", "epochs": 10},
        "dks2": {"overrides": {"method.name": "dks"}},
        "ds2": {"overrides": {"method.name": "ds"}},
    },
}
ROWS = [("baseline", "main", "baseline"), ("ssal1", "main", "SSAL x1 +TR (main)"), ("ssal1", "joint", "SSAL x1 +JP (joint)"),
        ("ssal3", "main", "SSAL x3 +TR (main)"), ("ssal3", "joint", "SSAL x3 +JP (joint)"), ("lc", "lc", "SSAL x3 +LC"),
        ("dks2", "main", "DKS (main)"), ("dks2", "ensemble", "DKS (ensemble)"), ("ds2", "main", "DS (main)")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/demo_accuracy.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data-root", default="data/demo", help="demo dataset folder (default: %(default)s)")
    parser.add_argument("--runs-root", default="runs/bench_demo_accuracy",
                        help="stores and run folders (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more overrides for every training stage")
    args = parser.parse_args(argv)
    if args.epochs < 1 or not args.seeds:
        print("error: --epochs must be >= 1 and --seeds non-empty", file=sys.stderr)
        return 2
    from pipeline.tracking import runs
    from pipeline.launch import study as study_lib, study_jobs
    from pipeline.train.config import resolve_path

    root = resolve_path(args.runs_root)
    root.mkdir(parents=True, exist_ok=True)
    study_file = root / "demo_accuracy.yaml"
    study_file.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    results: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        overrides = [f"train.seed={seed}", f"schedule.epochs={args.epochs}", f"schedule.peak_epoch={min(2, args.epochs)}",
                     f"data.root={args.data_root}", f"runs_root={root / f'seed{seed}'}", *args.overrides]
        try:
            study = study_lib.load_study(study_file, overrides)
        except study_lib.StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rc = study_jobs.run_local(study)
        client = runs.client(runs.resolve_uri(study.uri, study.runs_root))
        for run in runs.study_runs(client, study.id, status="FINISHED"):
            stage = run.data.tags.get("stage")
            for rule_stage, rule, _ in ROWS:
                value = run.data.metrics.get(f"val/top1/{rule}")
                if stage == rule_stage and value is not None:
                    results.setdefault((stage, rule), []).append(100 * value)
        if rc != 0:
            print(f"seed {seed}: some stages did not finish (see above); re-run to resume", file=sys.stderr)
    print(f"\nval top-1 (%) on the demo set, {args.epochs} epochs, seeds {args.seeds}")
    print(f"| {'head':<22} | {'mean':>6} | {'std':>5} | n | per seed |")
    print("|---|---:|---:|---:|---|")
    base = results.get(("baseline", "main"), [])
    for stage, rule, label in ROWS:
        values = results.get((stage, rule), [])
        if not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label:<22} | {statistics.mean(values):6.2f} | {std:5.2f} | {len(values)} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    joint = results.get(("ssal3", "joint"), []) or results.get(("ssal1", "joint"), [])
    if base and joint:
        delta = statistics.mean(joint) - statistics.mean(base)
        print(f"\nSSAL joint - baseline: {delta:+.2f} pp (target >= +2 pp): {'met' if delta >= 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
