"""Job arrays (``--array KEY=V1,V2,...``): the cartesian product of the values, one validated training job
(:class:`pipeline.launch.slurm.JobSpec`) per combination, each in its own run directory
``OUTPUT_DIR/<index>-<values>``; and :func:`load_job_config`, the config loader with the launcher's one-line
error. Imports ``pipeline.train.config`` and ``pipeline.launch.slurm``; used by :mod:`pipeline.launch.cli`.
"""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Sequence

from pipeline.launch.slurm import JobSpec, LaunchError
from pipeline.train.config import Config, ConfigError, load_config


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


def load_job_config(config_path: str | None, overrides: Sequence[str], what: str) -> Config:
    """The validated config; a bad one is a LaunchError naming `what` (e.g. 'config', 'array element 2 (...)')."""
    try:
        return load_config(config_path, list(overrides))
    except ConfigError as err:
        raise LaunchError(f"{what}: {err}") from None


def expand_jobs(args: argparse.Namespace, output_dir: str | None) -> list[JobSpec]:
    """The jobs of this launch, every config validated: one in `output_dir` (default: the config's run dir), or
    one per --array combination in its own folder under it."""
    base_cfg = load_job_config(args.config, args.overrides, "config")
    if not args.array:
        run_dir = Path(output_dir).resolve() if output_dir else base_cfg.run_dir
        return [JobSpec(base_cfg, run_dir)]
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
        cfg = load_job_config(config_path, overrides, what)
        if not any(override.startswith("tracking.run_name=") for override in overrides):
            overrides.append(f"tracking.run_name={cfg.run_name}-{label}")
            cfg = load_job_config(config_path, overrides, what)
        jobs.append(JobSpec(cfg, root / f"{index:03d}-{label}", label))
    return jobs
