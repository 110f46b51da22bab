"""Launch training: on this machine (``--local``) or as one SLURM job through submitit.

    python pipeline/launch.py --local [--nproc N] [--config CONFIG.yaml] [key=value ...]
    python pipeline/launch.py [--cluster NAME] --partition gpu --nodes 4 --gpus-per-node 8 \\
        [--cpus-per-task N] [--mem 64G] [--time HH:MM:SS] [--account A] [--qos Q] [--constraint C] \\
        [--job-name NAME] [--output-dir DIR] [--wait] [--array KEY=V1,V2,...] --config CONFIG.yaml [key=value ...]

The launcher is thin: it validates the config with the engine's schema (a bad config fails here, before
anything is submitted), builds a submitit executor, submits the engine's worker entry
(``pipeline.train:main`` wrapped by ``pipeline.submitit_launch.TrainTask``) and returns. It never knows
about the training loop.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repo root first on sys.path, not this script's folder
    _here = Path(__file__).resolve().parent
    _root = str(_here.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != _here and p != _root]

import argparse
import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import shlex
import shutil
import time
from typing import Any, Sequence

import yaml

from pipeline.config import Config, ConfigError, load_config, resolve_path, save_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "slurm"
EXIT_USAGE = 2

# profile keys (slurm/*.yaml) -> their meaning; command-line flags override them
PROFILE_KEYS = {
    "partition": "SLURM partition",
    "nodes": "number of nodes",
    "gpus_per_node": "GPUs per node; one task per GPU (0 = CPU nodes)",
    "tasks_per_node": "tasks per node when gpus_per_node is 0 (default 1)",
    "cpus_per_task": "CPUs per task (data-loading threads + the trainer)",
    "mem": "memory per node, sbatch syntax (e.g. 64G; 0 = all of it)",
    "time": "time limit, sbatch syntax (HH:MM:SS, D-HH:MM:SS, or minutes)",
    "signal_delay_s": "SIGUSR2 this many seconds before the time limit (checkpoint + requeue)",
    "account": "SLURM account",
    "qos": "SLURM quality of service",
    "constraint": "node features (sbatch --constraint)",
    "max_requeues": "how many times a job may requeue itself after preemption / time limit",
    "array_parallelism": "at most this many array elements run at once",
    "sbatch": "mapping of extra sbatch options ({exclusive: true, reservation: x, ...})",
    "setup": "shell lines run in the batch script before srun (module load ..., source venv/bin/activate)",
    "env": "mapping of environment variables for every task",
}
DEFAULTS: dict[str, Any] = {
    "partition": None, "nodes": 1, "gpus_per_node": 0, "tasks_per_node": None, "cpus_per_task": None,
    "mem": None, "time": "24:00:00", "signal_delay_s": 120, "account": None, "qos": None, "constraint": None,
    "max_requeues": 20, "array_parallelism": 16, "sbatch": {}, "setup": [], "env": {},
}
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class LaunchError(Exception):
    """A launcher usage problem: printed as one line, exit 2, nothing submitted."""


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    profiles = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))) or "none"
    p = argparse.ArgumentParser(
        prog="python pipeline/launch.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run training locally, or submit it as ONE SLURM job through submitit (one task per GPU,\n"
            "tasks_per_node = gpus_per_node; torch.distributed env from SLURM's; NCCL with GPUs, gloo without).\n"
            "The config is validated first: a bad config prints one line and exits 2, nothing is submitted.\n"
            "After submitting it prints the job id, the log paths and where the MLflow run is, and returns\n"
            "(--wait: follow rank 0's log until the job ends; the exit code is the job's)."),
        epilog=(
            "cluster profiles (slurm/NAME.yaml, or a path; flags override them): " + profiles + "\n"
            "  keys: " + ", ".join(PROFILE_KEYS) + "\n\n"
            "preemption / time limit: SLURM sends SIGUSR2 signal_delay_s before the end (sbatch --signal);\n"
            "  every rank stops at the next iteration, rank 0 writes an atomic checkpoint, the job requeues\n"
            "  itself (scontrol requeue) and continues with --resume auto in the same output dir and MLflow run.\n"
            "  Try it: scancel --signal=USR2 JOBID.  A plain `scancel JOBID` (SIGTERM) keeps the checkpoint and\n"
            "  marks the MLflow run KILLED; resume it with the same --output-dir and --resume auto.\n\n"
            "job arrays: --array KEY=V1,V2,... (repeatable: the cartesian product; KEY=config sweeps config\n"
            "  files) submits one array job, one element per combination, each in OUTPUT_DIR/<index>-<values>,\n"
            "  at most --array-parallelism running at once.\n\n"
            "examples:\n"
            "  python pipeline/launch.py --local                                  # the demo job, 1 process\n"
            "  python pipeline/launch.py --local --nproc 2 schedule.epochs=2      # 2 processes, gloo on CPU\n"
            "  python pipeline/launch.py --cluster example_gpu --nodes 4 --config configs/imagenet/resnet50_ssal3.yaml\n"
            "  python pipeline/launch.py --cluster testcluster --nodes 2 --wait   # slurm/testcluster.sh up first\n"
            "  python pipeline/launch.py --cluster testcluster --array train.seed=0,1,2 --array-parallelism 2\n"),
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--config", help="YAML recipe (default: the embedded demo job)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, section.key=value")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="local: passed to the worker. SLURM: only 'auto' (continue the run in --output-dir); "
                        "SLURM jobs always restart with --resume auto after a requeue")
    g.add_argument("--entry", default="pipeline.train:main", metavar="MODULE:FUNC",
                   help="worker entry taking argv and returning an exit code (default: %(default)s; for tests)")

    g = p.add_argument_group("local")
    g.add_argument("--local", action="store_true", help="run on this machine instead of submitting")
    g.add_argument("--nproc", type=int, default=1,
                   help="local processes: 1 = in this process; N > 1 = N worker processes (gloo on CPU), "
                        "stopped together: SIGTERM / SIGUSR2 / Ctrl-C checkpoint and stop them (exit 3)")

    g = p.add_argument_group("SLURM (flags override the --cluster profile)")
    g.add_argument("--cluster", metavar="NAME", help="profile slurm/NAME.yaml (or a path to a YAML file)")
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    g.add_argument("--tasks-per-node", type=int, dest="tasks_per_node",
                   help="only without GPUs (default 1); with GPUs it is gpus_per_node")
    g.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    g.add_argument("--mem", help="memory per node (sbatch syntax: 64G, 500M, 0 = all)")
    g.add_argument("--time", help="time limit: HH:MM:SS, D-HH:MM:SS or minutes")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--job-name", dest="job_name", help="default: the run name")
    g.add_argument("--signal-delay", type=int, dest="signal_delay_s", metavar="S",
                   help="seconds between SIGUSR2 and the time limit (default from the profile, else 120)")
    g.add_argument("--max-requeues", type=int, dest="max_requeues")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option (repeatable), e.g. --sbatch exclusive=true --sbatch reservation=x")
    g.add_argument("--output-dir", dest="output_dir",
                   help="run directory (checkpoints, MLflow run id, logs under slurm/); default: the config's")
    g.add_argument("--wait", action="store_true", help="follow rank 0's log until the job ends")
    g.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="submit a job array over these values (repeatable: cartesian product)")
    g.add_argument("--array-parallelism", type=int, dest="array_parallelism", metavar="N")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script(s), submit nothing")
    g = p.add_argument_group("studies (pipeline/study.py)")
    g.add_argument("--study", metavar="STUDY.yaml",
                   help="run a multi-stage study (studies/*.yaml): --local runs its unfinished stages here one after "
                        "the other; otherwise one SLURM job per stage with afterok dependencies (the SLURM flags "
                        "above apply to training stages); key=value overrides apply to every training stage")
    return p


# ----------------------------------------------------------------------------- profiles


def load_profile(name: str | None) -> dict[str, Any]:
    """DEFAULTS <- slurm/NAME.yaml (or the YAML file NAME)."""
    out = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in DEFAULTS.items()}
    if not name:
        return out
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")))
        raise LaunchError(f"--cluster {name}: no profile {path} (known: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"--cluster {name}: {path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"--cluster {name}: {path} must be a mapping")
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if unknown:
        raise LaunchError(f"--cluster {name}: unknown key(s) {', '.join(unknown)} in {path} "
                          f"(valid: {', '.join(PROFILE_KEYS)})")
    for key in ("sbatch", "env"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise LaunchError(f"--cluster {name}: '{key}' must be a mapping in {path}")
    if data.get("setup") is not None and not isinstance(data["setup"], list):
        raise LaunchError(f"--cluster {name}: 'setup' must be a list of shell lines in {path}")
    out.update({k: v for k, v in data.items() if v is not None})
    return out


def slurm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Profile, then the command-line flags that were given; checked."""
    s = load_profile(args.cluster)
    for key in ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "account",
                "qos", "constraint", "signal_delay_s", "max_requeues", "array_parallelism"):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    s["sbatch"] = dict(s["sbatch"])
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch {item}: expected KEY=VALUE")
        s["sbatch"][key.strip().lstrip("-")] = yaml.safe_load(value) if value else True
    for key in ("nodes",):
        if not isinstance(s[key], int) or s[key] < 1:
            raise LaunchError(f"{key}: must be an integer >= 1, got {s[key]!r}")
    for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
        if not isinstance(s[key], int) or s[key] < 0:
            raise LaunchError(f"{key}: must be an integer >= 0, got {s[key]!r}")
    for key in ("tasks_per_node", "cpus_per_task", "array_parallelism"):
        if s[key] is not None and (not isinstance(s[key], int) or s[key] < 1):
            raise LaunchError(f"{key}: must be an integer >= 1, got {s[key]!r}")
    if s["gpus_per_node"] > 0 and s["tasks_per_node"] not in (None, s["gpus_per_node"]):
        raise LaunchError(f"tasks_per_node ({s['tasks_per_node']}) must equal gpus_per_node "
                          f"({s['gpus_per_node']}): one task per GPU")
    s["tasks_per_node"] = s["gpus_per_node"] or s["tasks_per_node"] or 1
    if s["time"] is not None:
        s["time"] = str(s["time"])
        if not _TIME_RE.match(s["time"]):
            raise LaunchError(f"time: '{s['time']}' is not a SLURM time (HH:MM:SS, D-HH:MM:SS or minutes)")
    if s["mem"] is not None:
        s["mem"] = str(s["mem"])
        if not re.match(r"^\d+(\.\d+)?[KMGT]?B?$", s["mem"], re.I):
            raise LaunchError(f"mem: '{s['mem']}' is not a SLURM memory size (e.g. 64G, 500M, 0)")
    return s


def time_to_minutes(text: str) -> int:
    """SLURM time syntax -> minutes (rounded up): 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH[:MM[:SS]]'."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(x) for x in text.split(":")] + [0, 0]
        h, m, sec = parts[0], parts[1], parts[2]
    else:
        parts = [int(x) for x in text.split(":")]
        if len(parts) == 1:
            h, m, sec = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts
    return max(1, math.ceil(days * 1440 + h * 60 + m + sec / 60))


# ----------------------------------------------------------------------------- jobs


@dataclasses.dataclass
class JobSpec:
    """One training job to submit: its validated config, its run directory, a label."""

    config_path: str | None
    overrides: list[str]
    cfg: Config
    run_dir: Path
    label: str = ""


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


# ----------------------------------------------------------------------------- local


def run_local(args: argparse.Namespace) -> int:
    from pipeline.util import run_lock

    overrides = ([f"output_dir={Path(args.output_dir).resolve()}"] if args.output_dir else []) + list(args.overrides)
    cfg = _load(args.config, overrides, "config")  # fail fast, with the launcher's one-line message
    argv = (["--config", args.config] if args.config else []) + (["--resume", args.resume] if args.resume else [])
    argv += overrides
    if args.nproc < 1:
        raise LaunchError(f"--nproc: must be >= 1, got {args.nproc}")
    try:  # fail before any worker starts; rank 0 holds the lock for the whole run
        run_lock.check_free(cfg.run_dir)
    except run_lock.RunFolderBusy as err:
        raise LaunchError(str(err)) from None
    if args.nproc == 1:
        from pipeline.submitit_launch import resolve_entry

        return int(resolve_entry(args.entry)(argv) or 0)
    module = args.entry.split(":")[0]
    if args.entry.split(":")[1] != "main":
        raise LaunchError("--local --nproc N > 1 runs `python -m MODULE`: --entry must be MODULE:main")
    from pipeline.util.local_workers import run_workers

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    print(f"+ {args.nproc} x python -m {module} {shlex.join(argv)}", flush=True)
    return run_workers(module, argv, args.nproc, env, str(REPO_ROOT))


# ----------------------------------------------------------------------------- SLURM


def default_tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    try:
        from pipeline import tracking

        return tracking.default_tracking_uri(str(resolve_path(cfg.runs_root)))
    except (ImportError, AttributeError):
        return f"sqlite:///{resolve_path(cfg.runs_root) / 'mlflow.db'}"


RUN_ID_FILE = "mlflow_run_id"  # = pipeline.train.RUN_ID_FILE: the engine resumes the run named there


def create_mlflow_run(cfg: Config, run_dir: Path, uri: str) -> tuple[str | None, str]:
    """Create the job's MLflow run now (status SCHEDULED) and leave its id in the run dir, where the engine
    picks it up (and turns it RUNNING): the launcher can print the run's link at once. Best effort: if the
    tracking store cannot be reached, the engine creates the run when the job starts."""
    if not cfg.tracking.enabled:
        return None, "tracking disabled (tracking.enabled=false)"
    existing = run_dir / RUN_ID_FILE
    # a tracking server that does not answer must not hold the submission up for minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        import mlflow

        from pipeline import tracking

        client = mlflow.MlflowClient(tracking_uri=uri)
        if existing.is_file() and existing.read_text().strip():  # --resume auto of an earlier run
            run = client.get_run(existing.read_text().strip())
        else:
            exp_id = tracking._get_or_create_experiment(client, uri, cfg.tracking.experiment)
            run = client.create_run(exp_id, run_name=cfg.run_name, tags={"tracking.run_dir": str(run_dir)})
            client.update_run(run.info.run_id, status="SCHEDULED")
            run_dir.mkdir(parents=True, exist_ok=True)
            existing.write_text(run.info.run_id)
        rid, eid = run.info.run_id, run.info.experiment_id
    except Exception as err:  # noqa: BLE001 - never block a submission on tracking
        return None, f"(run created when the job starts; {type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if uri.startswith(("http://", "https://")):
        return rid, f"{uri.rstrip('/')}/#/experiments/{eid}/runs/{rid}"
    return rid, f"run {rid}: mlflow ui --backend-store-uri {uri}  then http://127.0.0.1:5000/#/experiments/{eid}/runs/{rid}"


SLURM_COMMANDS = ("sbatch", "srun")


def missing_slurm_commands() -> list[str]:
    """The SLURM client commands a submission needs that are not on PATH (sbatch submits, the job runs srun)."""
    return [name for name in SLURM_COMMANDS if shutil.which(name) is None]


def require_slurm() -> None:
    """One clear line (LaunchError) instead of submitit's RuntimeError when this machine has no SLURM."""
    missing = missing_slurm_commands()
    if missing:
        raise LaunchError(f"{' and '.join(missing)} not found: run this on a SLURM login node (or slurm/testcluster.sh "
                          "up; source its env.sh), or use --local (--dry-run shows the job without SLURM)")


def _script_only_executor_class():
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        """submitit refuses to build its SLURM executor without `srun` on PATH; rendering the sbatch script
        for --dry-run needs no SLURM, so this one skips that check (and is never asked to submit)."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    return ScriptOnlySlurmExecutor


def make_executor(folder: Path, s: dict[str, Any], job_name: str, script_only: bool = False):
    """submitit's SLURM executor with the job's settings. `script_only`: for rendering the script (--dry-run),
    also where SLURM is not installed."""
    import submitit

    executor_class = _script_only_executor_class() if script_only else submitit.SlurmExecutor
    executor = executor_class(folder=str(folder / "%j"))
    extra = dict(s["sbatch"])
    if s["time"]:
        extra.setdefault("time", s["time"])  # exact (submitit's own is in whole minutes)
    if s["mem"]:
        extra.setdefault("mem", s["mem"])
    params: dict[str, Any] = dict(
        job_name=job_name,
        nodes=s["nodes"],
        ntasks_per_node=s["tasks_per_node"],
        time=time_to_minutes(s["time"]) if s["time"] else 60 * 24,
        signal_delay_s=s["signal_delay_s"],
        # one failing task ends the step (and the job): nobody is left waiting in a collective
        srun_args=["--kill-on-bad-exit=1"],
        # the pre-end signal goes to the tasks (--signal=USR2@N, scancel --signal=USR2 JOBID); a stray USR2 to
        # the batch shell (scancel --batch) must not kill the script that runs srun
        setup=["trap '' USR2", f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
               f"cd {shlex.quote(str(REPO_ROOT))}", *[str(line) for line in s["setup"]]],
        additional_parameters=extra,
        array_parallelism=s["array_parallelism"],
    )
    if s["gpus_per_node"]:
        params["gpus_per_node"] = s["gpus_per_node"]
    if s["cpus_per_task"]:
        params["cpus_per_task"] = s["cpus_per_task"]
    for key in ("partition", "account", "qos", "constraint"):
        if s[key]:
            params[key] = s[key]
    executor.update_parameters(**params)
    return executor


def submit_slurm(args: argparse.Namespace) -> int:
    from pipeline.submitit_launch import TrainTask
    from pipeline.util.checkpoint import LAST

    s = slurm_settings(args)
    if args.resume not in (None, "", "auto"):
        raise LaunchError("--resume: SLURM jobs take only --resume auto (continue the run in --output-dir)")
    jobs = expand_jobs(args, args.output_dir)  # every config validated before anything is submitted
    for job in jobs:
        held = [name for name in (LAST, RUN_ID_FILE) if (job.run_dir / name).is_file()]
        if held and args.resume != "auto":
            raise LaunchError(f"output dir {job.run_dir} already holds a run ({', '.join(held)}): pass --resume auto "
                              f"to continue it, or choose another --output-dir")
    if not args.dry_run:
        require_slurm()
    tasks = []
    for job in jobs:
        cfg = dataclasses.replace(job.cfg, output_dir=str(job.run_dir))
        cfg_path = job.run_dir / "slurm" / "submitted_config.yaml"
        if not args.dry_run:
            save_config(cfg, cfg_path)  # exactly what was validated; the job reads it on every (re)start
        tasks.append(TrainTask(argv=["--config", str(cfg_path), "--resume", "auto"], entry=args.entry,
                               max_requeues=s["max_requeues"], env={str(k): str(v) for k, v in s["env"].items()}))

    first = jobs[0]
    folder = (first.run_dir if len(jobs) == 1 else first.run_dir.parent) / "slurm"
    job_name = args.job_name or (first.cfg.run_name if len(jobs) == 1 else f"{first.cfg.tracking.experiment}-array")
    executor = make_executor(folder, s, job_name, script_only=args.dry_run)
    ntasks = s["nodes"] * s["tasks_per_node"]

    if args.dry_run:
        text = executor._make_submission_file_text(executor._submitit_command_str, "DRYRUN")
        if len(jobs) > 1:
            text = text.replace("#SBATCH --job-name", f"#SBATCH --array=0-{len(jobs) - 1}%"
                                f"{min(len(jobs), s['array_parallelism'])}\n#SBATCH --job-name")
        print(text)
        for job, task in zip(jobs, tasks):
            print(f"# {job.label or 'job'}: {job.run_dir}  argv: {shlex.join(task.argv)}")
        missing = missing_slurm_commands()
        if missing:
            print(f"# SLURM not found on this machine ({' and '.join(missing)} not on PATH): the script above is "
                  f"what would be submitted; a real submission needs a SLURM login node")
        return 0

    uris = [default_tracking_uri(job.cfg) for job in jobs]
    links = [create_mlflow_run(job.cfg, job.run_dir, uri) for job, uri in zip(jobs, uris)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's refusal: it is in err
            if len(jobs) == 1:
                submitted = [executor.submit(tasks[0])]
            else:
                with executor.batch():
                    submitted = [executor.submit(t) for t in tasks]
    except Exception as err:
        for job, uri, (rid, _) in zip(jobs, uris, links):  # leave no SCHEDULED run behind
            _end_scheduled_run(uri, rid, job.run_dir)
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:500]
        raise LaunchError(f"submission failed: {type(err).__name__}: {message}") from None
    for uri, (rid, _), sj in zip(uris, links, submitted):
        _tag_runs(uri, [rid], [sj.job_id])
    for job, sj, (_, link) in zip(jobs, submitted, links):
        print(f"submitted job {sj.job_id}: {s['nodes']} node(s) x {s['tasks_per_node']} task(s) = {ntasks} "
              f"rank(s), partition {s['partition'] or '(default)'}{'  [' + job.label + ']' if job.label else ''}",
              flush=True)
        print(f"  run dir: {job.run_dir}")
        print(f"  logs:    {log_path(sj, 'out')}")
        print(f"           {log_path(sj, 'err')}   (rank r: _{{r}}_log.*)")
        print(f"  MLflow:  experiment '{job.cfg.tracking.experiment}': {link}")
    print(f"  follow:  squeue -j {submitted[0].job_id.split('_')[0]}; preempt: scancel --signal=USR2 JOBID; "
          f"stop: scancel JOBID", flush=True)
    if not args.wait:
        return 0
    codes = [follow(sj, job, uri) for job, sj, uri in zip(jobs, submitted, uris)]
    return max(codes)


def _end_scheduled_run(uri: str, run_id: str | None, run_dir: Path) -> None:
    if not run_id:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status == "SCHEDULED":
            client.delete_run(run_id)
            (run_dir / RUN_ID_FILE).unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort
        pass


def _tag_runs(uri: str, run_ids: Sequence[str | None], job_ids: Sequence[str]) -> None:
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        for rid, jid in zip(run_ids, job_ids):
            if rid:
                client.set_tag(rid, "slurm.job_id", jid)
    except Exception:  # noqa: BLE001 - best effort
        pass


def log_path(job, kind: str, rank: int = 0) -> Path:
    subs = getattr(job, "_sub_jobs", None) or []
    paths = subs[rank].paths if rank < len(subs) else job.paths
    return Path(str(paths.stdout if kind == "out" else paths.stderr).replace("%t", str(rank)))


def _job_state(job) -> str:
    try:
        return job.watcher.get_state(job.job_id, mode="force")
    except Exception:  # sacct hiccup: try again next time
        return "UNKNOWN"


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)")


def _error_tail(path: Path, keep: int = 10) -> list[str]:
    """The worker's own error report in a rank's stderr log: from its last 'error: ...' line to the exception
    line that ends the traceback under it (torch's '[rankN]:' reprints and submitit's lines left out)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip() and " INFO (" not in ln and "submitit ERROR" not in ln
                 and not re.match(r"^\[rank\d+\]:", ln)]
    except OSError:
        return []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if not starts:
        return []
    block = [lines[starts[-1]]]
    for ln in lines[starts[-1] + 1:]:
        block.append(ln)
        if _EXC_LINE.match(ln):
            break
    return block if len(block) <= keep + 1 else [block[0], "    ..."] + block[-keep:]


def follow(job, spec: JobSpec, uri: str, poll_s: float = 2.0) -> int:
    """Print rank 0's log as it grows until the job ends; then its outcome. Returns 0 if it completed."""
    from submitit.core import utils as submitit_utils

    files = [log_path(job, "out"), log_path(job, "err")]
    offsets = {f: 0 for f in files}
    run_id_file = spec.run_dir / RUN_ID_FILE
    announced = False
    done_since = None

    def pump() -> None:
        for f in files:
            try:
                with open(f, "rb") as fh:
                    fh.seek(offsets[f])
                    data = fh.read()
            except FileNotFoundError:
                continue
            if data:
                offsets[f] += len(data)
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()

    while True:
        pump()
        if not announced and run_id_file.is_file():
            print(f"[launch] MLflow run {run_id_file.read_text().strip()} in {uri}", flush=True)
            announced = True
        state = _job_state(job)
        if state.upper() not in ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED",
                                 "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"):
            done_since = done_since or time.time()
            if time.time() - done_since > 3:  # let the last log lines land
                break
        time.sleep(poll_s)
    pump()
    print(f"[launch] job {job.job_id} ended: {state}", flush=True)
    failed = []
    for rank, task in enumerate(job._sub_jobs or [job]):
        result = task.paths.result_pickle
        if result.is_file():
            outcome, payload = submitit_utils.pickle_load(result)
            if outcome == "error":
                failed.append((rank, str(payload).strip()))
    for rank, trace in failed:
        lines = trace.splitlines()
        print(f"[launch] rank {rank} failed: {lines[-1] if lines else '?'}", file=sys.stderr)
        if lines and "exited with code" not in lines[-1]:  # an exception outside the worker: its traceback
            print("\n".join("    " + ln for ln in lines[-25:]), file=sys.stderr)
    if not state.upper().startswith("COMPLETED"):
        # the worker's own report (e.g. "error: rank 1 of 2 failed: ...") is in that rank's stderr log
        ntasks = len(job._sub_jobs) or 1
        for rank in range(ntasks):
            tail = _error_tail(log_path(job, "err", rank))
            if tail:
                print(f"[launch] rank {rank} reported ({log_path(job, 'err', rank)}):", file=sys.stderr)
                print("\n".join("    " + ln for ln in tail), file=sys.stderr)
    if state.upper().startswith("COMPLETED") and not failed:
        print(f"[launch] done; run dir {spec.run_dir}", flush=True)
        return 0
    if state.upper().startswith("CANCELLED"):
        print(f"[launch] cancelled: a resumable checkpoint is kept in {spec.run_dir}; continue with "
              f"--resume auto --output-dir {spec.run_dir}", file=sys.stderr)
    elif not failed:
        print(f"[launch] job {job.job_id} did not complete ({state}); see {log_path(job, 'err')}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.study:
        from pipeline import study

        return study.launch_study(args)
    try:
        if args.local:
            slurm_only = [f for f in ("partition", "nodes", "gpus_per_node", "cluster", "array", "wait")
                          if getattr(args, f)]
            if slurm_only:
                raise LaunchError(f"--local does not take SLURM options ({', '.join('--' + f.replace('_', '-') for f in slurm_only)})")
            return run_local(args)
        return submit_slurm(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
