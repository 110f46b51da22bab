"""How long a study's training stages take, estimated from step counts and per-step costs measured
side by side against the baseline's (a loaded machine inflates absolute times; ratios survive).

    .venv/bin/python -m bench.demo_study_time                                  # studies/demo.yaml
    .venv/bin/python -m bench.demo_study_time --study studies/demo.yaml --baseline-step-seconds 0.45

For every training stage of the study (its config + overrides, random groupings of the stage's
groups file's k in place of the file), the model is built and one training step (forward, loss,
backward, at the recipe's batch and resolution) is timed interleaved with the baseline's, one
thread, process CPU time (bench/branch_overhead.py's clock). The estimate of a stage is
seeds x epochs x steps per epoch x its step ratio x ``--baseline-step-seconds`` (the wall time of one
baseline step on the quiet target machine, evaluation and loading included: measure it from a
baseline run's ``run/wall_seconds`` / its steps there), plus ``--stage-overhead`` seconds per process.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

import ssal_models
from bench.branch_overhead import make_step, time_steps
from pipeline.launch.study import load_study
from pipeline.train.config import REPO_ROOT, load_config
from ssal_models.grouping import random_grouping, save_groupings


def stage_config(stage, groups_files: dict):
    argv = stage.argv
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    overrides = [a for a in argv[argv.index("auto") + 1:]]
    overrides = [next((f"method.groups_file={groups_files[p]}" for p in groups_files if a.endswith(str(p))), a)
                 for a in overrides]
    return load_config(config, overrides)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(REPO_ROOT / "studies" / "demo.yaml"))
    parser.add_argument("--num-classes", type=int, default=32, help="classes of the study's dataset (demo: 32)")
    parser.add_argument("--train-images", type=int, default=2560, help="train split size (demo: 32 x 80)")
    parser.add_argument("--baseline-step-seconds", type=float, required=True,
                        help="wall seconds of one baseline step on the quiet target machine, all included")
    parser.add_argument("--stage-overhead", type=float, default=15.0,
                        help="seconds per stage process (start-up, data, tracking; default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = load_study(args.study, [f"runs_root={tempfile.mkdtemp(prefix='study-time-')}"])
    tmp = Path(tempfile.mkdtemp(prefix="study-time-groups-"))
    groups_files = {}
    for stage in study.stages.values():
        if stage.kind == "groups":
            path = tmp / f"{stage.name}.json"
            save_groupings(path, [random_grouping(args.num_classes, k, seed=i) for i, k in enumerate(stage.spec.k)],
                           [str(c) for c in range(args.num_classes)])
            groups_files[stage.output] = path
    train = {s.seeded_stage or s.name: s for s in study.stages.values() if s.kind == "train"}  # one seed each
    seeds = sum(1 for s in study.stages.values() if s.kind == "train") // max(1, len(train))
    steps, plan = {}, {}
    for name, stage in train.items():
        cfg = stage_config(stage, groups_files)
        options = dict(cfg.method.options)
        if cfg.method.groups_file:
            options["groupings"] = [g["assignment"] for g in json.loads(Path(cfg.method.groups_file).read_text())
                                    ["groupings"]]
        model = ssal_models.build_model(cfg.model.arch, cfg.method.name, args.num_classes, **options).train()
        x = torch.randn(cfg.data.batch_size, 3, cfg.data.max_res, cfg.data.max_res)
        y = torch.randint(0, args.num_classes, (cfg.data.batch_size,))
        steps[name] = make_step(model, x, y, nullcontext)  # CPU training runs in float32
        per_epoch = math.ceil(args.train_images * (1 - cfg.eval.holdout_fraction) / cfg.data.batch_size)
        plan[name] = (cfg.schedule.epochs, per_epoch)
    seconds = time_steps(steps, torch.device("cpu"), 1, args.repeats, "cpu")
    base = seconds[next(iter(train))]
    others = sum(1 for s in study.stages.values() if s.kind != "train")
    total = others * args.stage_overhead
    print(f"study {study.id}: {seeds} seed(s); baseline step {base * 1e3:.0f} ms CPU (1 thread), "
          f"quiet wall {args.baseline_step_seconds:.2f} s assumed; {args.stage_overhead:.0f} s per process")
    print("| stage | epochs | steps/epoch | step x baseline | est. min (all seeds) |")
    print("|---|---:|---:|---:|---:|")
    for name, (epochs, per_epoch) in plan.items():
        ratio = seconds[name] / base
        stage_seconds = seeds * (epochs * per_epoch * ratio * args.baseline_step_seconds + args.stage_overhead)
        total += stage_seconds
        print(f"| {name} | {epochs} | {per_epoch} | {ratio:.2f} | {stage_seconds / 60:.1f} |")
    print(f"estimated study time: {total / 60:.1f} min (training stages + {others} other stage processes)")


if __name__ == "__main__":
    main()
