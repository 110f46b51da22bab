"""TODO docstring."""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Sequence


from pipeline.train.config import Config, ConfigError, load_config
from pipeline.launch.slurm import JobSpec, LaunchError


def parse_array(items: Sequence[str]) -> list[list[tuple[str, str]]]:
    """['train.seed=0,1', 'optim.lr=0.1,0.2'] -> the cartesian product as [(key, value), ...] lists."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise LaunchError(f"--array {item}: expected KEY=V1,V2,... (KEY=config for config files)")
        axes.append([(key, v) for v in vals])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def _slug(pairs: Sequence[tuple[str, str]]) -> str:
    text = "_".join(f"{k.split('.')[-1]}={Path(v).stem if k == 'config' else v}" for k, v in pairs)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)[:80]


def _load(config_path: str | None, overrides: Sequence[str], what: str) -> Config:
    try:
        return load_config(config_path, list(overrides))
    except ConfigError as err:
        raise LaunchError(f"{what}: {err}") from None


def expand_jobs(args: argparse.Namespace, output_dir: str | None) -> list[JobSpec]:
    """The jobs of this launch, every config validated: one, or one per --array combination.

    (The study issue plugs in here: a study file would expand into JobSpecs the same way.)
    """
    base_cfg = _load(args.config, args.overrides, "config")
    if not args.array:
        run_dir = Path(output_dir).resolve() if output_dir else base_cfg.run_dir
        return [JobSpec(args.config, list(args.overrides), base_cfg, run_dir)]
    combos = parse_array(args.array)
    root = Path(output_dir).resolve() if output_dir else base_cfg.run_dir
    jobs = []
    for index, combo in enumerate(combos):
        config_path = args.config
        overrides = list(args.overrides)
        for key, value in combo:
            if key == "config":
                config_path = value
            else:
                overrides.append(f"{key}={value}")
        label = _slug(combo)
        what = f"array element {index} ({', '.join(f'{k}={v}' for k, v in combo)})"
        cfg = _load(config_path, overrides, what)
        if not any(o.startswith("tracking.run_name=") for o in overrides):
            overrides.append(f"tracking.run_name={cfg.run_name}-{label}")
            cfg = _load(config_path, overrides, what)
        jobs.append(JobSpec(config_path, overrides, cfg, root / f"{index:03d}-{label}", label))
    return jobs
