"""What runs inside every SLURM task that `pipeline/launch.py` submits through submitit.

submitit pickles a ``TrainTask`` (argv for the worker entry + a few launch settings), ``sbatch``es a script
that ``srun``s one Python process per task, and each process calls ``TrainTask()``. The task:

1. installs our preemption handlers (``pipeline.train.preemption``), replacing the ones submitit installed
   (submitit's USR2 handler would requeue at once, before our checkpoint exists);
2. exports the torch.distributed environment from SLURM's (submitit's ``TorchDistributedEnvironment``:
   MASTER_ADDR = first node of the job, MASTER_PORT from the job id, RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE), which ``pipeline.train.dist.init_distributed_mode`` reads first;
3. calls the worker entry (default ``pipeline.train.entry:main``) with ``--resume auto`` so that a requeued job
   continues from the last checkpoint in the same output dir, hence the same MLflow run;
4. maps the entry's exit code:
   * 0 -> returns a small summary (submitit pickles it as the task's result);
   * ``EXIT_PREEMPTED`` after SIGUSR2 -> global rank 0 runs ``scontrol requeue <job>`` (up to
     ``max_requeues`` times); every rank leaves with ``SystemExit`` so submitit writes no result file
     (a result file would tell the client the job is over);
   * ``EXIT_PREEMPTED`` after SIGTERM (scancel) -> leaves quietly, no requeue (the run is marked KILLED);
   * anything else -> raises, the task exits non-zero and ``srun --kill-on-bad-exit=1`` ends every other
     task at once (no rank left hanging in a collective); the error is in that task's log and in the
     ``job.exception()`` the launcher prints. The code is left in the run dir (``write_exit``) for:
5. the batch script, once ``srun`` returned non-zero: ``python -m pipeline.launch.task --srun-exit $? ...``
   (``teardown_main``) decides with ``pipeline.train.restarts`` whether the failure is one to restart from
   the last checkpoint (a task killed or lost, a hang, a crash; not a config error or a non-finite loss) and
   requeues the job (``scontrol requeue``), or prints why not. A requeue for preemption or a scancel kills the
   batch script before it gets there.

Nothing here knows about the training loop.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.train import preemption, restarts
from pipeline.train.watchdog import HEARTBEAT_DIR

DEFAULT_ENTRY = "pipeline.train.entry:main"
EXIT_FILE = "exit-rank{rank}.json"  # a task's exit code (in the run dir's HEARTBEAT_DIR), for the batch script


def _log(msg: str) -> None:
    print(f"[launch {socket.gethostname()} rank={os.environ.get('SLURM_PROCID', '?')}] {msg}", file=sys.stderr,
          flush=True)


def resolve_entry(spec: str) -> Callable[[list[str]], int]:
    """'package.module:function' -> the function."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"entry must look like 'package.module:function', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise ValueError(f"entry {spec!r}: module {module_name} has no {func_name}") from None


def slurm_job_id() -> str:
    """The id to requeue: '<array job>_<task>' for array elements, else SLURM_JOB_ID."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ["SLURM_JOB_ID"]


def requeue_job(job_id: str, attempts: int = 5) -> None:
    """``scontrol requeue`` (the job goes back to PENDING with the same id and starts again from its script)."""
    last = ""
    for i in range(attempts):
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        last = (proc.stderr or proc.stdout).strip()
        time.sleep(1 + i)
    raise RuntimeError(f"scontrol requeue {job_id} failed: {last}")


@dataclass
class TrainTask:
    """The pickled callable of one SLURM job (or one element of a job array)."""

    argv: list[str]  # worker argv, e.g. ["--config", "/abs/config.yaml", "--resume", "auto"]
    entry: str = DEFAULT_ENTRY  # 'module:function' taking argv, returning an exit code
    max_requeues: int = 20  # give up requeueing after this many restarts (SLURM_RESTART_COUNT)
    export_torch_env: bool = True  # export MASTER_ADDR/PORT, RANK, ... from SLURM's variables
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the worker
    run_dir: str | None = None  # where the task leaves its exit code for the batch script (automatic restarts)

    def __call__(self) -> dict[str, Any]:
        preemption.install_handlers()  # after submitit's: ours win
        # only a SLURM job with requeues left continues after a USR2; otherwise the engine ends the run (KILLED)
        preemption.allow_requeue("SLURM_JOB_ID" in os.environ and preemption.restart_count() < self.max_requeues)
        os.environ.update(self.env)
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        if self.export_torch_env and "SLURM_JOB_ID" in os.environ:
            import submitit

            dist_env = submitit.helpers.TorchDistributedEnvironment()
            # keep CUDA_VISIBLE_DEVICES as SLURM set it (all of the node's GPUs): the engine picks cuda:LOCAL_RANK
            dist_env.export(set_cuda_visible_devices=False, overwrite=True)
            _log(f"world_size={dist_env.world_size} local_rank={dist_env.local_rank} "
                 f"master={dist_env.master_addr}:{dist_env.master_port} restart={preemption.restart_count()} "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
        entry = resolve_entry(self.entry)
        try:
            rc = entry(list(self.argv))
        except BaseException:
            self._leave_exit(rank, 1)
            raise
        rc = 0 if rc is None else int(rc)
        if rc != preemption.EXIT_PREEMPTED:
            self._leave_exit(rank, rc)
        elif not preemption.requeue_pending():  # stopped by a SIGTERM: srun ending the step after another task
            self._leave_exit(rank, -signal.SIGTERM)  # failed (a scancel ends the batch script too)
        if rc == 0:
            return {"rank": rank, "host": socket.gethostname(), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                    "restarts": preemption.restart_count(), "exit_code": 0}
        if rc == preemption.EXIT_PREEMPTED:
            self._after_stop(rank)  # never returns
        raise RuntimeError(f"{self.entry} exited with code {rc} on rank {rank} ({socket.gethostname()}); "
                           f"see its log above")

    def _leave_exit(self, rank: int, code: int) -> None:
        if self.run_dir and "SLURM_JOB_ID" in os.environ:
            try:
                write_exit(Path(self.run_dir), rank, code)
            except OSError as err:
                _log(f"could not leave the exit code for the restart decision: {err}")

    def _after_stop(self, rank: int) -> None:
        if not preemption.requeue_pending():
            _log("stopped without requeue (scancel / SIGTERM): the checkpoint is kept, the run is marked KILLED")
            raise SystemExit(preemption.EXIT_PREEMPTED)
        if rank != 0:
            # exit 0 so that srun --kill-on-bad-exit does not kill rank 0 before it has requeued the job;
            # SystemExit (not a return) so that submitit writes no result file for this attempt
            _log("preempted: checkpoint done, rank 0 requeues the job")
            raise SystemExit(0)
        requeues = preemption.restart_count()
        if requeues >= self.max_requeues:
            self._leave_exit(rank, preemption.EXIT_PREEMPTED)  # nor restarted as a failure
            raise RuntimeError(f"preempted after {requeues} requeues (max_requeues={self.max_requeues}): not "
                               f"requeueing again; resume by hand with --resume auto and the same --output-dir")
        job_id = slurm_job_id()
        preemption.mark_requeue_pending()
        _log(f"preempted: requeueing job {job_id} (restart {requeues + 1}/{self.max_requeues})")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM may end this process now
        requeue_job(job_id)
        time.sleep(120)  # SLURM kills this attempt; leave anyway if it does not
        raise SystemExit(0)


# ----------------------------------------------------------------------------- the batch script's side


def write_exit(run_dir: Path, rank: int, code: int) -> None:
    """This task's exit code, for the batch script once ``srun`` returned (a killed task leaves none)."""
    folder = run_dir / HEARTBEAT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    attempt = preemption.restart_count()
    (folder / EXIT_FILE.format(rank=rank)).write_text(json.dumps({"code": code, "attempt": attempt,
                                                                   "at": time.time()}))


def read_exits(run_dir: Path, ntasks: int) -> tuple[dict[int, int | None], dict[int, float]]:
    """Every task's exit code of this start (SLURM_RESTART_COUNT), None where it left none, and when it ended;
    the files removed."""
    attempt = preemption.restart_count()
    codes: dict[int, int | None] = {rank: None for rank in range(ntasks)}
    ended_at: dict[int, float] = {}
    for rank in range(ntasks):
        path = run_dir / HEARTBEAT_DIR / EXIT_FILE.format(rank=rank)
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            continue
        if data.get("attempt") == attempt:
            codes[rank], ended_at[rank] = data["code"], data["at"]
    return codes, ended_at


def teardown_command(python: str, ntasks: int, max_restarts: int, run_dirs: list[str]) -> list[str]:
    """The sbatch script's lines after ``srun`` (submitit's ``teardown``): the restart decision."""
    return ["srun_exit=$?",
            f"{shlex.quote(python)} -m pipeline.launch.task --srun-exit $srun_exit --ntasks {ntasks} "
            f"--max-restarts {max_restarts} {' '.join(shlex.quote(d) for d in run_dirs)}",
            "exit $srun_exit"]


def teardown_main(argv: list[str] | None = None) -> int:
    """After ``srun`` returned non-zero: requeue this job from its last checkpoint, or print why not."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch.task",
                                     description="The sbatch script's teardown: after a failed srun, requeue the "
                                                 "job from its last checkpoint or print why not.")
    parser.add_argument("--srun-exit", type=int, required=True, help="srun's exit code ($?)")
    parser.add_argument("--ntasks", type=int, required=True)
    parser.add_argument("--max-restarts", type=int, required=True)
    parser.add_argument("run_dirs", nargs="+", help="each array element's run dir (one for a plain job)")
    args = parser.parse_args(argv)
    if args.srun_exit == 0:
        return 0
    element = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    run_dir = Path(args.run_dirs[element if len(args.run_dirs) > 1 else 0])
    codes, ended_at = read_exits(run_dir, args.ntasks)
    if all(code == 0 for code in codes.values()):  # srun failed around tasks that all ended well
        codes = {rank: None for rank in codes}
    job_id = slurm_job_id()
    verdict = restarts.decide(run_dir, codes, args.max_restarts, job=f"slurm-{job_id}", ended_at=ended_at)
    print(f"[restart] job {job_id}: {verdict.line}", file=sys.stderr, flush=True)
    if verdict.restart:
        requeue_job(job_id)
        time.sleep(120)  # SLURM ends this script with the requeue; leave anyway if it does not
    return args.srun_exit


if __name__ == "__main__":
    sys.exit(teardown_main())
