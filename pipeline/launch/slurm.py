"""TODO docstring."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.tracking.constants import RUN_ID_FILE
from pipeline.train import schema
from pipeline.train.config import REPO_ROOT, Config

PROFILE_DIR = REPO_ROOT / "slurm"
EXIT_USAGE = 2


@dataclasses.dataclass
class SlurmProfile:
    """A cluster profile (slurm/NAME.yaml); command-line flags override it. A key set to null keeps its default."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU (0 = CPU nodes)
    tasks_per_node: int | None = None  # when gpus_per_node is 0 (default 1)
    cpus_per_task: int | None = None  # data-loading threads + the trainer
    mem: str | int | None = None  # memory per node, sbatch syntax (e.g. 64G; 0 = all of it)
    time: str | int | None = "24:00:00"  # time limit, sbatch syntax (HH:MM:SS, D-HH:MM:SS, or minutes)
    signal_delay_s: int = 120  # SIGUSR2 this many seconds before the time limit (checkpoint + requeue)
    account: str | None = None
    qos: str | None = None  # quality of service
    constraint: str | None = None  # node features (sbatch --constraint)
    max_requeues: int = 20  # how many times a job may requeue itself after preemption / time limit
    array_parallelism: int = 16  # at most this many array elements run at once
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra options {exclusive: true, ...}
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun (module load, source ...)
    env: dict[str, Any] = dataclasses.field(default_factory=dict)  # environment variables for every task


PROFILE_KEYS = schema.keys_of(SlurmProfile)
FLAG_KEYS = ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "account",
             "qos", "constraint", "signal_delay_s", "max_requeues", "array_parallelism")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class LaunchError(Exception):
    """A launcher usage problem: printed as one line, exit 2, nothing submitted."""


def load_profile(name: str | None) -> SlurmProfile:
    """The defaults <- slurm/NAME.yaml (or the YAML file NAME)."""
    profile = SlurmProfile()
    if not name:
        return profile
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")))
        raise LaunchError(f"--cluster {name}: no profile {path} (known: {known})")
    try:
        data = schema.read_yaml(path, f"--cluster {name}") or {}
    except schema.SchemaError as err:
        raise LaunchError(f"--cluster {name}: {err}") from None
    if isinstance(data, dict):  # null keeps the default (example_gpu.yaml lists `account: null` ...)
        data = {key: getattr(profile, key, None) if value is None else value for key, value in data.items()}
    try:
        schema.merge(profile, data)
    except schema.SchemaError as err:
        where = f"--cluster {name}" if Path(name) == path else f"--cluster {name}: {path}"
        raise LaunchError(f"{where}: {err}") from None
    return profile


def slurm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Profile, then the command-line flags that were given; checked. A dict of SlurmProfile's keys."""
    profile = load_profile(args.cluster)
    flags = {key: getattr(args, key) for key in FLAG_KEYS if getattr(args, key, None) is not None}
    try:
        schema.merge(profile, flags)
    except schema.SchemaError as err:
        raise LaunchError(str(err)) from None
    s = dataclasses.asdict(profile)
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch {item}: expected KEY=VALUE")
        s["sbatch"][key.strip().lstrip("-")] = yaml.safe_load(value) if value else True
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("signal_delay_s", 0), ("max_requeues", 0),
                     ("tasks_per_node", 1), ("cpus_per_task", 1), ("array_parallelism", 1)):
        if s[key] is not None and s[key] < low:
            raise LaunchError(f"{key}: must be an integer >= {low}, got {s[key]!r}")
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


LIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
               "RESIZING", "SIGNALING", "STAGE_OUT")


@dataclasses.dataclass
class JobSpec:
    """One training job to submit: its validated config, its run directory, a label."""

    config_path: str | None
    overrides: list[str]
    cfg: Config
    run_dir: Path
    label: str = ""
