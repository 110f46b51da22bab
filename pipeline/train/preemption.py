"""Preemption / stop requests: a process-local flag set by signals, polled by the training loop.

Protocol (shared by the engine and the SLURM task, ``pipeline/launch/task.py``):

* ``install_handlers()`` — called at the start of a worker (the submitit task calls it *after* submitit
  installed its own handlers, so ours win; calling it again is harmless):
    - ``SIGUSR2`` = **preempt + requeue**: SLURM's pre-end signal (``--signal=USR2@N``, sent to every task
      N seconds before the time limit or preemption), or ``scancel --signal=USR2 JOBID`` by hand.
      submitit's own USR2 handler would requeue at once, without our checkpoint: it is replaced.
    - ``SIGTERM`` = **killed**: ``scancel`` without requeue (or a node shutting down). A second SIGTERM
      while the first is still pending restores the default action and re-raises (the process dies).
    - ``SIGHUP`` = **killed**, never escalating: the terminal closed, or the ``launch.py --local`` launcher
      died (its workers' parent-death signal). Left ignored when it is ignored at start (``nohup``).
  Both only set a flag (nothing heavy happens in the handler).
* The engine polls ``requested()`` once per iteration, all-reduces it across ranks, and when set: rank 0
  writes an atomic, resumable checkpoint (mid-epoch, with the iteration), the process group is torn down,
  and ``pipeline.train.entry.main`` returns ``EXIT_PREEMPTED``.
* The worker entry (``pipeline.train.entry``) marks the MLflow run KILLED unless ``will_requeue()`` (USR2 seen
  *and* a requeuer registered by ``allow_requeue()``: the SLURM task, below): then the run stays
  open/RUNNING-to-be-continued and the requeued job resumes it with ``--resume auto``. A USR2 outside such a task (a local run, torchrun) is a plain stop.
* The launcher's task then requeues the job (rank 0, ``scontrol requeue``) when ``requeue_pending()``,
  and just exits otherwise.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from pipeline.train.exit_codes import EXIT_PREEMPTED

PREEMPT = "preempt"  # USR2: checkpoint, then requeue (same run continues)
KILLED = "killed"  # TERM: checkpoint if there is time, no requeue (run marked KILLED)

_state: dict = {"reason": None, "signal": None, "time": None, "installed": False, "requeue": False,
                "requeuer": False}


def _note(msg: str) -> None:
    # os.write: safe to call from a signal handler, unbuffered (reaches SLURM logs at once)
    try:
        os.write(2, f"[preemption pid={os.getpid()}] {msg}\n".encode())
    except OSError:
        pass


def _on_usr2(signum, frame) -> None:
    _state["requeue"] = True
    if _state["reason"] != PREEMPT:
        _state.update(reason=PREEMPT, signal=signum, time=time.time())
        _note(f"got {signal.Signals(signum).name}: checkpoint at the next iteration, then requeue")


def _on_term(signum, frame) -> None:
    if _state["reason"] == KILLED:  # second TERM: give up waiting for the loop
        _note(f"second {signal.Signals(signum).name}: exiting now")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _state["reason"] is None:
        _state.update(reason=KILLED, signal=signum, time=time.time())
        _note(f"got {signal.Signals(signum).name}: checkpoint at the next iteration, then stop (no requeue)")
    else:
        # TERM after USR2: SLURM kills the steps of a job being requeued; keep the preempt decision
        _note(f"got {signal.Signals(signum).name} after a preemption request: still requeueing")


def _on_hup(signum, frame) -> None:
    # the terminal or the launcher is gone (launch.py's workers get it when the launcher dies): a stop that
    # repeats never escalates, as the kernel may deliver the launcher's death more than once (once per thread)
    if _state["reason"] is None:
        _state.update(reason=KILLED, signal=signum, time=time.time())
        _note(f"got {signal.Signals(signum).name} (terminal or launcher gone): checkpoint at the next iteration, "
              f"then stop (no requeue)")


def install_handlers() -> None:
    """SIGUSR2 -> preempt+requeue, SIGTERM -> killed, SIGHUP -> killed (unless ignored, as under nohup).
    Main thread only (Python's rule for signals)."""
    signal.signal(signal.SIGUSR2, _on_usr2)
    signal.signal(signal.SIGTERM, _on_term)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _on_hup)
    _state["installed"] = True


def requested() -> bool:
    """True once a stop was asked for (either signal): the loop should checkpoint and return."""
    return _state["reason"] is not None


def reason() -> str | None:
    """None, PREEMPT ("preempt") or KILLED ("killed")."""
    return _state["reason"]


def requeue_pending() -> bool:
    """True when the job will be requeued (USR2 seen, or ``mark_requeue_pending()``): do not mark the run KILLED."""
    return bool(_state["requeue"])


def allow_requeue(possible: bool = True) -> None:
    """The SLURM task calls this before the worker entry when it can requeue the job (under SLURM, requeues
    left): only then does a preemption leave the run open for the requeued job."""
    _state["requeuer"] = bool(possible)


def will_requeue() -> bool:
    """True when a stop will be followed by a requeue of this job: USR2 seen and a requeuer registered."""
    return requeue_pending() and bool(_state["requeuer"])


def mark_requeue_pending() -> None:
    """The launcher calls this before asking SLURM to requeue (its SIGTERM must not read as a kill)."""
    _state["requeue"] = True


def request(kind: str = PREEMPT) -> None:
    """Set the flag without a signal (tests, or a rank that learned about it from an all-reduce)."""
    if kind not in (PREEMPT, KILLED):
        raise ValueError(f"kind must be {PREEMPT!r} or {KILLED!r}, got {kind!r}")
    if kind == PREEMPT:
        _state["requeue"] = True
    if _state["reason"] is None:
        _state.update(reason=kind, signal=None, time=time.time())


def reset() -> None:
    """Clear the flag (tests; a new run in the same process). Handlers stay installed."""
    _state.update(reason=None, signal=None, time=None, requeue=False, requeuer=False)


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 on the first start, or outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


__all__ = [
    "EXIT_PREEMPTED", "PREEMPT", "KILLED", "install_handlers", "requested", "reason", "requeue_pending",
    "mark_requeue_pending", "allow_requeue", "will_requeue", "request", "reset", "restart_count",
]

if __name__ == "__main__":  # pragma: no cover - manual check: python -m pipeline.train.preemption
    install_handlers()
    print(f"pid {os.getpid()}: send USR2 or TERM", file=sys.stderr)
    while not requested():
        time.sleep(0.1)
    print(reason(), requeue_pending())
