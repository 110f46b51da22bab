"""``launch.py --local --nproc N``: N worker processes on this machine, supervised.

It does what ``torchrun --standalone`` does for one machine (a TCPStore served from here, the
torch.distributed variables for each worker, the other workers stopped when one fails), and what
torchrun does not do for a training that checkpoints on a stop:

* a stop signal to the launcher (SIGTERM, SIGUSR2; Ctrl-C / SIGINT / SIGHUP count as SIGTERM) is sent
  once to the workers' process group, and the launcher waits for them: they checkpoint at the next
  iteration and exit with ``EXIT_PREEMPTED``, which is the launcher's exit code. A second one stops
  them at once (the workers' own rule). The workers run in their own process group, so Ctrl-C in a
  terminal reaches them only through here, once;
* the workers' exit code is the launcher's: a stop or a config error (exit 3, 2) is one line from
  rank 0, not torchrun's ChildFailedError block with exit 1;
* if the launcher dies (even SIGKILL), the kernel sends each worker SIGHUP (``PR_SET_PDEATHSIG``):
  they checkpoint and stop instead of training on unsupervised;
* nothing is left in /tmp (torchrun leaves an empty ``torchelastic_*`` folder per run).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from pipeline.train.config import REPO_ROOT
from pipeline.train.exit_codes import EXIT_HUNG, ORDERLY_EXITS

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR2: signal.SIGUSR2,
             signal.SIGINT: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
ORDERLY_GRACE_S = 300.0  # ranks still running this long after another's orderly non-zero exit get SIGTERM
KILL_AFTER_S = 30.0  # ... and SIGKILL this long after the SIGTERM (a crash: SIGTERM at once)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        # SIGHUP, not SIGTERM: the kernel sends it once per exiting thread of the parent, and a second
        # SIGTERM would stop a worker at once (pipeline.train.preemption), before its checkpoint
        _LIBC.prctl(1, int(signal.SIGHUP))  # PR_SET_PDEATHSIG


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N, as a shell says


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a Python child process on this machine: this checkout first on PYTHONPATH, so that a worker or a
    study stage imports the same code as the launcher (also from a second checkout of an installed project)."""
    inherited = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    return dict(env, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *inherited]))


@dataclass
class WorkersExit:
    code: int  # the launcher's exit code: the first failure's (a hang's over its partners' errors), else 0
    rank_codes: dict[int, int]  # each rank's return code (negative: killed by that signal)
    ended_at: dict[int, float]  # when the launcher saw each rank end (time.time())
    stopped: bool  # the launcher was asked to stop (a signal): not a failure to restart


def run_workers(module: str, argv: Sequence[str], nproc: int, env: dict[str, str], cwd: str) -> WorkersExit:
    """Run ``python -m module *argv`` as ranks 0..nproc-1 of one process group; how they ended."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False)
    base = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                # every rank is a client of the store served here, as under torchrun (no port race)
                TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    procs: list[subprocess.Popen] = []
    pgid = 0
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if pgid:
            try:
                os.killpg(pgid, FORWARDED[signal.Signals(signum)])
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd,
                                          env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                                          process_group=pgid, preexec_fn=_die_with_parent))
            pgid = pgid or procs[0].pid
        if received:  # a signal that came while the workers were starting
            os.killpg(pgid, FORWARDED[signal.Signals(received[0])])
        ended_at: dict[int, float] = {}
        code = _wait(procs, pgid, ended_at)
        return WorkersExit(code, {rank: proc.returncode for rank, proc in enumerate(procs)}, ended_at, bool(received))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.poll() is None:  # only if waiting itself failed
                proc.kill()
                proc.wait()
        del store


def _wait(procs: list[subprocess.Popen], pgid: int, ended_at: dict[int, float]) -> int:
    first_failure: int | None = None
    term_at = kill_at = None
    while True:
        codes = [proc.poll() for proc in procs]
        now = time.monotonic()
        for rank, code in enumerate(codes):
            if code is not None:
                ended_at.setdefault(rank, time.time())
            if code == EXIT_HUNG and first_failure not in (None, EXIT_HUNG):
                first_failure = code  # the cause, not a partner's error on the closed connection
            if code not in (None, 0) and first_failure is None:
                first_failure = code
                # a crash leaves the others in a collective: stop them now; an orderly exit is followed by the
                # others on their own (rank 0 may still be writing its checkpoint), this is only a safety net
                term_at = now if code not in ORDERLY_EXITS else now + ORDERLY_GRACE_S
                failed = f"rank {rank} exited with code {_exit_code(code)}"
        if None not in codes:
            return _exit_code(first_failure or 0)
        if term_at is not None and now >= term_at:
            print(f"[launch] {failed}: stopping the other ranks", file=sys.stderr, flush=True)
            _signal_group(pgid, signal.SIGTERM)
            _signal_group(pgid, signal.SIGCONT)  # a stopped rank (a hang) takes its SIGTERM now, as under srun
            term_at, kill_at = None, now + KILL_AFTER_S
        if kill_at is not None and now >= kill_at:
            _signal_group(pgid, signal.SIGKILL)
            kill_at = None
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
