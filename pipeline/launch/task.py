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
     ``job.exception()`` the launcher prints.

Nothing here knows about the training loop.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.train import preemption

DEFAULT_ENTRY = "pipeline.train.entry:main"


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
        rc = entry(list(self.argv))
        rc = 0 if rc is None else int(rc)
        if rc == 0:
            return {"rank": rank, "host": socket.gethostname(), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                    "restarts": preemption.restart_count(), "exit_code": 0}
        if rc == preemption.EXIT_PREEMPTED:
            self._after_stop(rank)  # never returns
        raise RuntimeError(f"{self.entry} exited with code {rc} on rank {rank} ({socket.gethostname()}); "
                           f"see its log above")

    def _after_stop(self, rank: int) -> None:
        if not preemption.requeue_pending():
            _log("stopped without requeue (scancel / SIGTERM): the checkpoint is kept, the run is marked KILLED")
            raise SystemExit(preemption.EXIT_PREEMPTED)
        if rank != 0:
            # exit 0 so that srun --kill-on-bad-exit does not kill rank 0 before it has requeued the job;
            # SystemExit (not a return) so that submitit writes no result file for this attempt
            _log("preempted: checkpoint done, rank 0 requeues the job")
            raise SystemExit(0)
        restarts = preemption.restart_count()
        if restarts >= self.max_requeues:
            raise RuntimeError(f"preempted after {restarts} requeues (max_requeues={self.max_requeues}): not "
                               f"requeueing again; resume by hand with --resume auto and the same --output-dir")
        job_id = slurm_job_id()
        preemption.mark_requeue_pending()
        _log(f"preempted: requeueing job {job_id} (restart {restarts + 1}/{self.max_requeues})")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM may end this process now
        requeue_job(job_id)
        time.sleep(120)  # SLURM kills this attempt; leave anyway if it does not
        raise SystemExit(0)
