"""SLURM plumbing that the launch CLI (:mod:`pipeline.launch.cli`) and studies (:mod:`pipeline.launch.study_jobs`)
share: a cluster profile (``slurm/NAME.yaml``) and the command-line flags merged into one settings dict
(:func:`slurm_settings`), submitit's SLURM executor built from it (:func:`make_executor`), the one submit path
(:func:`submit`: sbatch's refusal as one ``LaunchError`` line, the jobs submitted before it cancelled), which
SLURM job states mean a job is still to run or not over yet, and following a job's rank-0 log to its end
(``--wait``: :func:`follow`).

It imports ``pipeline.train.config`` (the repository root, the config a job runs), ``pipeline.train.schema``
(the profile's dataclass) and ``pipeline.tracking.runs`` (the run id a job's folder names); submitit only
when an executor is built. Only the other modules of ``pipeline.launch`` import it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from pipeline.launch.task import teardown_command
from pipeline.tracking import credentials, runs
from pipeline.train import schema
from pipeline.train.config import REPO_ROOT, Config

PROFILE_DIR = REPO_ROOT / "slurm"


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
    max_restarts: int = 3  # how many times a job is requeued after a failure that is not the user's (0: never)
    array_parallelism: int = 16  # at most this many array elements run at once
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra options {exclusive: true, ...}
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun (module load, source ...)
    env: dict[str, Any] = dataclasses.field(default_factory=dict)  # environment variables for every task


PROFILE_KEYS = schema.keys_of(SlurmProfile)
FLAG_KEYS = ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "account",
             "qos", "constraint", "signal_delay_s", "max_requeues", "max_restarts", "array_parallelism")
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
    settings = dataclasses.asdict(profile)
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch {item}: expected KEY=VALUE")
        settings["sbatch"][key.strip().lstrip("-")] = yaml.safe_load(value) if value else True
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("signal_delay_s", 0), ("max_requeues", 0),
                     ("max_restarts", 0), ("tasks_per_node", 1), ("cpus_per_task", 1), ("array_parallelism", 1)):
        if settings[key] is not None and settings[key] < low:
            raise LaunchError(f"{key}: must be an integer >= {low}, got {settings[key]!r}")
    if settings["gpus_per_node"] > 0 and settings["tasks_per_node"] not in (None, settings["gpus_per_node"]):
        raise LaunchError(f"tasks_per_node ({settings['tasks_per_node']}) must equal gpus_per_node "
                          f"({settings['gpus_per_node']}): one task per GPU")
    settings["tasks_per_node"] = settings["gpus_per_node"] or settings["tasks_per_node"] or 1
    check_no_secrets(settings)
    if settings["time"] is not None:
        settings["time"] = str(settings["time"])
        if not _TIME_RE.match(settings["time"]):
            raise LaunchError(f"time: '{settings['time']}' is not a SLURM time (HH:MM:SS, D-HH:MM:SS or minutes)")
    if settings["mem"] is not None:
        settings["mem"] = str(settings["mem"])
        if not re.match(r"^\d+(\.\d+)?[KMGT]?B?$", settings["mem"], re.I):
            raise LaunchError(f"mem: '{settings['mem']}' is not a SLURM memory size (e.g. 64G, 500M, 0)")
    return settings


def check_no_secrets(settings: dict[str, Any]) -> None:
    """A password or token set in a profile would be written into the job's files (and printed by --dry-run):
    the tasks get it from the environment that sbatch passes on instead (slurm/README.md)."""
    lines = [("setup", str(line)) for line in settings["setup"]]
    lines += [("sbatch", f"{key}={value}") for key, value in settings["sbatch"].items()]
    written = [f"env.{key}" for key in settings["env"] if key in credentials.SECRET_VARIABLES]
    written += [f"{where} '{name}=...'" for where, text in lines for name in credentials.SECRET_VARIABLES
                if f"{name}=" in text]
    if written:
        raise LaunchError(f"{written[0]}: a secret in the SLURM profile would be written into the job script; "
                          f"export it in the shell that submits (sbatch passes the environment to the tasks), or "
                          f"`source` a 0600 file in setup (slurm/README.md)")


def check_cpus_per_task(settings: dict[str, Any], jobs: Sequence["JobSpec"]) -> None:
    """Refuse a GPU job whose tasks would get too few CPUs: without cpus_per_task SLURM gives each task one,
    and FFCV's ``data.num_workers`` decoding threads need cores of their own besides the main thread's, which
    queues the GPU's work (a starved main thread leaves the GPU idle)."""
    if not settings["gpus_per_node"]:
        return
    cpus = settings["cpus_per_task"]
    for job in jobs:
        workers = job.cfg.data.num_workers
        where = f"{job.label}: " if job.label else ""
        fix = (f"pass --cpus-per-task {workers + 2} (data.num_workers={workers} loader threads + 1-2 cores for the "
               f"main thread) or set cpus_per_task in the --cluster profile")
        if cpus is None:
            raise LaunchError(f"{where}cpus_per_task: not set for a GPU job, SLURM would give each task 1 CPU: {fix}")
        if workers >= cpus:
            fewer = cpus - 2 if cpus > 2 else cpus - 1
            raise LaunchError(f"{where}data.num_workers={workers} >= cpus_per_task={cpus} leaves no core for the "
                              f"main thread: {fix}" + (f", or lower data.num_workers to {fewer}" if fewer else ""))


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


def make_executor(folder: Path, settings: dict[str, Any], job_name: str, script_only: bool = False,
                  restart_run_dirs: Sequence[Path] = ()):
    """submitit's SLURM executor with the job's settings. `script_only`: for rendering the script (--dry-run),
    also where SLURM is not installed. `restart_run_dirs` (a training job's run dir, each array element's):
    after a failed ``srun`` the batch script requeues the job, up to ``max_restarts`` times
    (``pipeline.launch.task.teardown_main``)."""
    import submitit

    executor_class = _script_only_executor_class() if script_only else submitit.SlurmExecutor
    executor = executor_class(folder=str(folder / "%j"))
    extra = dict(settings["sbatch"])
    if settings["time"]:
        extra.setdefault("time", settings["time"])  # exact (submitit's own is in whole minutes)
    if settings["mem"]:
        extra.setdefault("mem", settings["mem"])
    params: dict[str, Any] = dict(
        job_name=job_name,
        nodes=settings["nodes"],
        ntasks_per_node=settings["tasks_per_node"],
        time=time_to_minutes(settings["time"]) if settings["time"] else 60 * 24,
        signal_delay_s=settings["signal_delay_s"],
        # one failing task ends the step (and the job): nobody is left waiting in a collective
        srun_args=["--kill-on-bad-exit=1"],
        # the pre-end signal goes to the tasks (--signal=USR2@N, scancel --signal=USR2 JOBID); a stray USR2 to
        # the batch shell (scancel --batch) must not kill the script that runs srun
        setup=["trap '' USR2", f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
               f"cd {shlex.quote(str(REPO_ROOT))}", *[str(line) for line in settings["setup"]]],
        additional_parameters=extra,
        array_parallelism=settings["array_parallelism"],
    )
    if restart_run_dirs and settings["max_restarts"] > 0:
        # --requeue: SLURM itself requeues the job when a node fails (NODE_FAIL), the batch script with it
        extra.setdefault("requeue", True)
        params["teardown"] = teardown_command(sys.executable, settings["nodes"] * settings["tasks_per_node"],
                                              settings["max_restarts"], [str(d) for d in restart_run_dirs])
    if settings["gpus_per_node"]:
        params["gpus_per_node"] = settings["gpus_per_node"]
    if settings["cpus_per_task"]:
        params["cpus_per_task"] = settings["cpus_per_task"]
    for key in ("partition", "account", "qos", "constraint"):
        if settings[key]:
            params[key] = settings[key]
    executor.update_parameters(**params)
    return executor


# ----------------------------------------------------------------------------- submitting


def submit(build_executor: Callable[[], Any], tasks: Sequence[Callable[[], Any]], what: str,
           submitted_before: Sequence[str] = ()) -> list:
    """Submit `tasks` through the executor `build_executor()` returns: one job, or one job array for several
    tasks. Returns submitit's jobs.

    submitit echoes sbatch's refusal on stderr: that is kept off the terminal, and the refusal (or an error
    building the executor) becomes one LaunchError line, ``<what> failed: <type>: <sbatch's message>``. The
    jobs `submitted_before` (the earlier links of the same chain) are cancelled then: a half-submitted chain
    is worse than none."""
    try:
        executor = build_executor()
        with contextlib.redirect_stderr(io.StringIO()):
            if len(tasks) == 1:
                return [executor.submit(tasks[0])]
            with executor.batch():
                jobs = [executor.submit(task) for task in tasks]
            return jobs
    except Exception as err:  # noqa: BLE001 - sbatch's refusal (submitit's FailedJobError) and the like
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:500]
        if submitted_before:
            message += (f"; cancelled the job(s) submitted before it ({', '.join(submitted_before)})"
                        if cancel_jobs(submitted_before) else
                        f"; could NOT cancel the jobs submitted before it: scancel {' '.join(submitted_before)}")
        raise LaunchError(f"{what} failed: {type(err).__name__}: {message}") from None


def cancel_jobs(job_ids: Sequence[str]) -> bool:
    """``scancel`` these jobs; whether it worked."""
    try:
        return subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ----------------------------------------------------------------------------- job states

# SLURM job states (squeue's and sacct's names) of a job whose outcome is still to come: queued, running or
# requeued (our tasks requeue themselves with scontrol: REQUEUED, then PENDING). A study does not submit a stage
# again while its earlier job is in one of them.
STILL_TO_RUN_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "SIGNALING", "SUSPENDED", "RESIZING",
                                 "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
# Following a job to its end (--wait) waits longer: also while SLURM still holds a job whose tasks are done
# (COMPLETING, STAGE_OUT: the last log lines may still land), after SLURM preempted it (PREEMPTED: it may be
# requeued), and while submitit does not know its state (READY: sacct has not seen it yet; UNKNOWN: sacct did
# not answer). submitit's own ``job.done()`` would count CONFIGURING, SUSPENDED and REQUEUE_* as over.
NOT_OVER_STATES = STILL_TO_RUN_STATES | {"COMPLETING", "STAGE_OUT", "PREEMPTED", "READY", "UNKNOWN"}


def job_state(job) -> str:
    """SLURM's state of a submitit job now (sacct, asked again: the state cached by ``job.state`` may be
    a minute old); UNKNOWN while sacct has no answer."""
    try:
        return job.get_info(mode="force").get("State") or "UNKNOWN"
    except Exception:  # noqa: BLE001 - sacct hiccup: try again next time
        return "UNKNOWN"


def is_over(state: str) -> bool:
    """Whether a job in this sacct state ('CANCELLED by 0' counts as CANCELLED) has ended for good."""
    return (state.split() or ["UNKNOWN"])[0].upper() not in NOT_OVER_STATES


# ----------------------------------------------------------------------------- following a job


@dataclasses.dataclass
class JobSpec:
    """One training job to submit: its validated config, its run directory, a label (array elements)."""

    cfg: Config
    run_dir: Path
    label: str = ""


def log_path(job, kind: str, rank: int = 0) -> Path:
    """Rank `rank`'s stdout ('out') or stderr ('err') log of a submitit job."""
    paths = job.task(rank).paths
    return Path(paths.stdout if kind == "out" else paths.stderr)


def task_failure(task) -> str | None:
    """The traceback that a task's function raised; None if it returned, or wrote no result at all (killed:
    its log says why)."""
    if not task.paths.result_pickle.is_file():  # exception() would wait up to 15 s for it
        return None
    error = task.exception()
    if error is None:
        return None
    # submitit's FailedJobError holds the task's traceback between two rulers of dashes
    inner = re.search(r"^-{10,}\n(.*)\n-{10,}$", str(error), re.S | re.M)
    return (inner.group(1) if inner else str(error)).strip()


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
    files = [log_path(job, "out"), log_path(job, "err")]
    offsets = {f: 0 for f in files}
    announced = False
    over_since = None

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
        run_id = None if announced else runs.recorded_run_id(spec.run_dir)
        if run_id:
            print(f"[launch] MLflow run {run_id} in {uri}", flush=True)
            announced = True
        state = job_state(job)
        if is_over(state):
            over_since = over_since or time.time()
            if time.time() - over_since > 3:  # let the last log lines land
                break
        time.sleep(poll_s)
    pump()
    print(f"[launch] job {job.job_id} ended: {state}", flush=True)
    failed = [(rank, trace) for rank in range(job.num_tasks)
              if (trace := task_failure(job.task(rank))) is not None]
    for rank, trace in failed:
        lines = trace.splitlines()
        print(f"[launch] rank {rank} failed: {lines[-1] if lines else '?'}", file=sys.stderr)
        if lines and "exited with code" not in lines[-1]:  # an exception outside the worker: its traceback
            print("\n".join("    " + ln for ln in lines[-25:]), file=sys.stderr)
    completed = state.upper().startswith("COMPLETED")
    if not completed:
        # the worker's own report (e.g. "error: rank 1 of 2 failed: ...") is in that rank's stderr log
        for rank in range(job.num_tasks):
            tail = _error_tail(log_path(job, "err", rank))
            if tail:
                print(f"[launch] rank {rank} reported ({log_path(job, 'err', rank)}):", file=sys.stderr)
                print("\n".join("    " + ln for ln in tail), file=sys.stderr)
    if completed and not failed:
        print(f"[launch] done; run dir {spec.run_dir}", flush=True)
        return 0
    if state.upper().startswith("CANCELLED"):
        print(f"[launch] cancelled: a resumable checkpoint is kept in {spec.run_dir}; continue with "
              f"--resume auto --output-dir {spec.run_dir}", file=sys.stderr)
    elif not failed:
        print(f"[launch] job {job.job_id} did not complete ({state}); see {log_path(job, 'err')}", file=sys.stderr)
    return 1
