"""The hang watchdog: a rank that makes no training progress for ``train.hang_timeout_s`` ends the job in
seconds with one line naming it (rank, host, last step finished) and ``EXIT_HUNG``, instead of every other
rank waiting in the next collective for the process group's timeout.

Each rank's :class:`Watchdog` thread writes the rank's heartbeat (global step finished, when, the loop's phase,
a beat time) to ``<run dir>/.heartbeat/rank<N>.json`` every ``timeout / 10`` s and reads every rank's. Files,
not torch.distributed's TCPStore: the store lives in rank 0's process under SLURM (a hung or dead rank 0 takes
it away), a second thread would share the store client with the main thread's collectives, and the files stay
after the job for a restarter or a person to read (the run folder is on a shared file system on a cluster).

A rank is *hung* when its beat is older than the timeout (the process is stopped or gone), or when it sits
between steps (phase ``host``) with no step finished for the timeout while the others wait in a collective.
Every rank's watchdog that sees a hang exits the process with ``EXIT_HUNG`` (the main thread is stuck in a
collective and cannot unwind); the first to see it creates ``.heartbeat/hang.json`` (the verdict, for a
restarter) and prints the one line. The hung rank's stacks: a process on the reporter's host that does not
answer gets SIGUSR1 (``faulthandler`` dumps every thread's stack on its stderr once it runs again, even with the
GIL held by a stuck call); any other dumps its own when its watchdog reads the verdict naming it.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from pipeline.train.exit_codes import EXIT_HUNG

HEARTBEAT_DIR = ".heartbeat"
VERDICT_FILE = "hang.json"  # the first rank to see a hang creates it: it alone prints; the rest exit silently
# auto timeout: 5 x the slowest step seen absorbs a step slowed by a checkpoint write elsewhere, a loader stall
# or a slow node's jitter; the floor of 120 s covers what is not a step (the flag agreement waiting for a
# rank that evaluates or saves, the first steps of an epoch at a new resolution) without waiting 30 minutes
AUTO_FACTOR, AUTO_FLOOR_S = 5.0, 120.0
# the process group's timeout also covers what the watchdog does not judge (evaluation, checkpoint writes,
# the set-up collectives while rank 0 opens the MLflow run): never below this
COLLECTIVE_FLOOR_S = 300.0
SETUP_COLLECTIVE_TIMEOUT_S = 1800  # until the auto timeout is known (torch's default)
HANG_HOLD_ENV = "SSAL_TEST_HANG"  # tests only: "RANK@STEP" blocks that rank in Python after global step STEP
JUDGED_PHASES = ("step", "sync", "host")  # "setup", "idle" (evaluation, saves) and "done" are not judged


def collective_timeout_s(hang_timeout_s: float) -> int:
    """The process group's collective timeout for an explicit ``train.hang_timeout_s`` (0 = auto: the
    set-up value, lowered once the watchdog knows its timeout)."""
    if hang_timeout_s <= 0:
        return SETUP_COLLECTIVE_TIMEOUT_S
    return int(max(COLLECTIVE_FLOOR_S, 2 * hang_timeout_s))


class Watchdog:
    """This rank's heartbeat and its view of every rank's (see the module's docstring)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, hang_timeout_s: float):
        self.folder = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.explicit_timeout = hang_timeout_s if hang_timeout_s > 0 else None
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.progress_at, self.phase = 0, time.time(), "setup"
        self.step_started = self.slowest = 0.0
        self.steps_seen = 0
        self.started_at = time.time()
        self.epoch_first_step = True
        self.collective_timeout_set = self.explicit_timeout is not None  # then entry set it at init
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self.hold = os.environ.get(HANG_HOLD_ENV, "")

    # -- the main thread's side: plain attribute writes, nothing that waits

    def start(self, global_step: int = 0) -> None:
        """From the run's current step (a resume's): the step a failure reached (``restarts.progress``)."""
        self.step = global_step
        self.started_at = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # a verdict of an earlier start (resumed after a hang); rank 0 starts before any judging
            (self.folder / VERDICT_FILE).unlink(missing_ok=True)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self._thread.start()

    def stop(self) -> None:
        """The run ended here (any way): a last beat says so, the others do not wait for this one's beats."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
            self.phase = "done"
            try:
                self._beat()
            except OSError:
                pass

    def epoch_begin(self) -> None:
        """An epoch starts: its first step is not judged (the loader restarts; a new resolution recompiles a
        compiled model, minutes on a small CPU), nor counted as the slowest step."""
        self.epoch_first_step = True

    def step_begin(self) -> None:
        self.step_started = time.monotonic()
        self.phase = "setup" if self.epoch_first_step else "step"

    def step_done(self, global_step: int) -> None:
        if self.steps_seen and not self.epoch_first_step:  # a process's / an epoch's first step says nothing
            self.slowest = max(self.slowest, time.monotonic() - self.step_started)
        self.epoch_first_step = False
        self.steps_seen += 1
        self.step, self.progress_at, self.phase = global_step, time.time(), "host"
        if not self.collective_timeout_set and self.timeout() is not None:
            self.collective_timeout_set = True
            set_collective_timeout(max(COLLECTIVE_FLOOR_S, 2 * self.timeout()))
        if self.hold == f"{self.rank}@{global_step}":
            while True:  # tests: a rank stuck in Python, its stack dumped by its own watchdog
                time.sleep(1)

    def sync(self) -> None:
        """The ranks' flag agreement (a collective) begins."""
        self.phase = "sync"

    def idle(self) -> None:
        """Evaluation or a checkpoint write: not judged (the collective timeout covers it)."""
        self.phase, self.progress_at = "idle", time.time()

    def timeout(self) -> float | None:
        """None (not judged) until this process finished its first step (loader start, compilation)."""
        if self.explicit_timeout is not None:
            return self.explicit_timeout if self.steps_seen >= 1 else None
        return max(AUTO_FLOOR_S, AUTO_FACTOR * self.slowest) if self.steps_seen >= 2 else None

    # -- the thread

    def _run(self) -> None:
        while not self._stop.wait(beat_interval_s(self.timeout() or 10.0)):
            try:
                self._beat()
                beats = self._read()
            except OSError:
                continue  # a file system hiccup: the next beat tries again
            verdict = self._verdict()
            if verdict is not None:  # another rank saw the hang (this one may be the one it names)
                if verdict["rank"] == self.rank:
                    if verdict.get("signalled"):
                        time.sleep(1.0)  # its SIGUSR1 (sent right after the verdict) dumps this one's stacks
                    else:
                        self._dump_own_stacks()
                os._exit(EXIT_HUNG)
            hung = find_hung(beats, time.time())
            if hung is not None:
                self._fail(*hung, beats)

    def _beat(self) -> None:
        beat = {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step,
                "progress_at": self.progress_at, "phase": self.phase, "timeout": self.timeout(), "beat_at": time.time()}
        path = self.folder / f"rank{self.rank}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(beat))
        os.replace(temporary, path)

    def _read(self) -> list[dict]:
        beats = []
        for rank in range(self.world_size):
            try:
                beat = json.loads((self.folder / f"rank{rank}.json").read_text())
            except (FileNotFoundError, ValueError):
                continue  # not started yet
            if beat["beat_at"] >= self.started_at:  # older: an earlier start's (a resume after a kill or a requeue)
                beats.append(beat)
        return beats

    def _verdict(self) -> dict | None:
        try:
            return json.loads((self.folder / VERDICT_FILE).read_text())
        except (FileNotFoundError, ValueError):  # none, or being written (the next beat reads it)
            return None

    def _dump_own_stacks(self) -> None:
        print(f"rank {self.rank}: hung after global step {self.step}; its threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)

    def _fail(self, culprit: dict, answering: bool, beats: list[dict]) -> None:
        # a hung process on this host that does not answer gets SIGUSR1: faulthandler's C handler dumps its stacks
        # even when its watchdog thread cannot run (the GIL held in a stuck call); one that answers, or is on
        # another host, dumps its own once its watchdog reads the verdict naming it
        signalled = not answering and culprit["host"] == self.host and culprit["rank"] != self.rank
        try:
            fd = os.open(self.folder / VERDICT_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, json.dumps({**culprit, "answering": answering, "signalled": signalled,
                                     "seen_by": self.rank}).encode())
            os.close(fd)
            reporter = self.rank
        except FileExistsError:
            reporter = None
        if self.rank == reporter and signalled:
            try:
                os.kill(culprit["pid"], signal.SIGUSR1)  # before the line: whoever resumes it has seen the line
            except OSError:
                pass
        silent_s = time.time() - (culprit["progress_at"] if answering else culprit["beat_at"])
        timeout = max(b["timeout"] for b in beats if b["timeout"])  # as find_hung judged (not the culprit's last beat)
        if self.rank == reporter:
            state = {"host": "stuck between steps", "step": "inside a step", "sync": "in the flag agreement"}.get(
                culprit["phase"], culprit["phase"]) if answering else "not answering (stopped, or its node gone)"
            print(f"error: hang: rank {culprit['rank']} on {culprit['host']} (pid {culprit['pid']}) made no progress "
                  f"for {silent_s:.0f} s after finishing global step {culprit['step']}, {state} "
                  f"(train.hang_timeout_s {timeout:.0f} s); exit {EXIT_HUNG}", file=sys.stderr,
                  flush=True)
        if self.rank == culprit["rank"]:
            self._dump_own_stacks()
        sys.stderr.flush()
        os._exit(EXIT_HUNG)


def find_hung(beats: list[dict], now: float) -> tuple[dict, bool] | None:
    """(the hung rank's heartbeat, whether it still answers), or None. A rank busy with work that is not judged
    (evaluation, a save) and still answering vetoes: the others wait for it."""
    judged = [b for b in beats if b["timeout"]]
    if not judged:
        return None
    timeout = max(b["timeout"] for b in judged)
    silent = [b for b in beats if now - b["beat_at"] > timeout and b["phase"] != "done"]
    if silent:
        return min(silent, key=lambda b: b["rank"]), False
    if any(b["phase"] not in JUDGED_PHASES or not b["timeout"] for b in beats):
        return None
    if any(now - b["beat_at"] > 3 * beat_interval_s(timeout) for b in beats):
        return None  # a rank stopped lately: it is named once its beat is older than the timeout (above)
    stalled = [b for b in beats if now - b["progress_at"] > timeout]
    if not stalled:
        return None
    between_steps = [b for b in stalled if b["phase"] == "host"]  # not waiting in a collective: the one stuck
    return min(between_steps or stalled, key=lambda b: (b["step"], b["progress_at"], b["rank"])), True


def beat_interval_s(timeout_s: float) -> float:
    """A tenth of the timeout (a hang is seen within 10 % of it), at most 5 s (a file write per rank), at least 0.1 s."""
    return min(5.0, max(0.1, timeout_s / 10))


def set_collective_timeout(seconds: float) -> None:
    """The default process group's timeout from now on (no-op without one)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))
        except (AttributeError, RuntimeError):
            pass  # older torch or a backend without it: the set-up value stays
