"""Automatic restarts after a failure that is not the user's (issue 24): the decision and its ledger.

A run that fails (a task killed by a signal or lost with its node, a hang the watchdog ended with
``EXIT_HUNG``, a crash) is started again from its last checkpoint with ``--resume auto``, at most
``max_restarts`` times, by whoever supervised it: the SLURM job's batch script after ``srun`` returned
(``python -m pipeline.train.restarts ...``, then ``scontrol requeue``: see ``pipeline.launch.slurm``), or
``launch.py --local --nproc N --max-restarts K`` for its workers. Not restarted:

* exit 2 (a config, file or disk problem) and exit 4 (a non-finite loss): the user's to fix; exit 3 from a
  SLURM task whose preemption requeues are used up;
* a failure with no training progress since the previous one (the same global step twice in a row): a
  deterministic crash is not retried forever;
* a stop on request (scancel, Ctrl-C) never gets here: its supervisor is told, or killed, first.

The ledger ``<run dir>/restarts.json`` lists every failure seen (when, why, the global step reached,
restarted or not); rank 0 of the next start logs each restart once to MLflow (tag ``restarts``, tag
``restart.<n>.reason``, metric ``run/restarts`` at step n) and prints it. The global step reached is the
highest step of the ranks' heartbeats (``pipeline.train.watchdog``), which every rank writes as it trains.
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ssal_datasets.files import atomic_write

from pipeline.train.exit_codes import EXIT_HUNG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USAGE
from pipeline.train.watchdog import HEARTBEAT_DIR, VERDICT_FILE

LEDGER = "restarts.json"
NOT_RESTARTED = {EXIT_USAGE: "a config, file or disk problem: the user's to fix",
                 EXIT_NONFINITE: "a non-finite loss: the user's to fix",
                 EXIT_PREEMPTED: "a stop for preemption or the time limit with no requeue left (max_requeues)"}


@dataclass
class Verdict:
    restart: bool
    line: str  # printed by the supervisor, one line
    number: int = 0  # this restart's number (1-based) when restart


def _signal_of(code: int | None) -> signal.Signals | None:
    """The signal that ended a process: a negative return code, or a shell's 128 + N."""
    number = None if code is None else -code if code < 0 else code - 128 if code > 128 else None
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "gone without an exit code (killed, or its node lost)"
    signum = _signal_of(code)
    if signum is not None:
        return f"killed by {signum.name}"
    return f"exited with code {code}" + (" (hung)" if code == EXIT_HUNG else "")


def read_ledger(run_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(run_dir) / LEDGER).read_text())["failures"]
    except FileNotFoundError:
        return []


def _write_ledger(run_dir: Path, failures: list[dict]) -> None:
    atomic_write(Path(run_dir) / LEDGER, json.dumps({"failures": failures}, indent=1))


def progress(run_dir: Path) -> int:
    """The highest global step any rank's heartbeat says it finished (0 when none has one)."""
    steps = [0]
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank*.json"):
        try:
            steps.append(int(json.loads(path.read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return max(steps)


def failure_reason(run_dir: Path, codes: dict[int, int | None], ended_at: dict[int, float] | None = None) -> str:
    """The watchdog's verdict when a rank hung, else the rank whose end names the failure (``_cause_order``;
    among equals the first to end: a partner errs on the closed connection after)."""
    try:
        hang = json.loads((Path(run_dir) / HEARTBEAT_DIR / VERDICT_FILE).read_text())
        return f"hang: rank {hang['rank']} on {hang['host']} made no progress after global step {hang['step']}"
    except (OSError, ValueError, KeyError):
        pass
    failed = [(rank, code) for rank, code in sorted(codes.items()) if code != 0]
    if not failed:
        return "the job failed (no rank reported an error)"
    ended_at = ended_at or {}
    rank, code = min(failed, key=lambda item: (_cause_order(item[1]), ended_at.get(item[0], float("inf")), item[0]))
    return f"rank {rank} {describe_exit(code)}"


def _cause_order(code: int | None) -> int:
    """Which rank's end names the failure: one gone without a code, then one killed (not by the SIGTERM a
    supervisor sends the others), a hang, an error; a rank stopped by SIGTERM last (a partner's end)."""
    if code is None:
        return 0
    signum = _signal_of(code)
    if signum == signal.SIGTERM:
        return 4
    return 1 if signum else 2 if code == EXIT_HUNG else 3


def decide(run_dir: Path, codes: dict[int, int | None], max_restarts: int, job: str,
           ended_at: dict[int, float] | None = None) -> Verdict:
    """Record the failure of a start whose ranks exited with `codes` (None: no code known; `ended_at`: when,
    where known) and say whether to start again. Called by the supervisor of `job` (a SLURM job id, a local
    launcher's), once per failed start; `max_restarts` counts this job's restarts."""
    run_dir = Path(run_dir)
    final = sorted((rank, code) for rank, code in codes.items() if code in NOT_RESTARTED)
    if final:
        rank, code = final[0]
        return Verdict(False, f"not restarting: rank {rank} exited with code {code} ({NOT_RESTARTED[code]}; its "
                              f"error is in that rank's log)")
    failures = read_ledger(run_dir)
    step, reason = progress(run_dir), failure_reason(run_dir, codes, ended_at)
    restarted = sum(1 for f in failures if f["restarted"] and f["job"] == job)
    if failures and failures[-1]["global_step"] == step:
        verdict = Verdict(False, f"not restarting: failed again at global step {step} with no progress since the "
                                 f"previous failure ({reason}; before: {failures[-1]['reason']}): a failure that "
                                 f"repeats is not transient; fix it, then continue with --resume auto")
    elif restarted >= max_restarts:
        verdict = Verdict(False, f"not restarting: {reason} (the run had reached global step {step}), and the "
                                 f"{restarted} restart(s) allowed (max_restarts {max_restarts}) are used; continue "
                                 f"with --resume auto")
    else:
        verdict = Verdict(True, f"restart {restarted + 1}/{max_restarts}: {reason} (the run had reached global step "
                                f"{step}); starting again from the last checkpoint", restarted + 1)
    failures.append({"at": time.time(), "job": job, "reason": reason, "global_step": step,
                     "restarted": verdict.restart, "logged": False})
    _write_ledger(run_dir, failures)
    (run_dir / HEARTBEAT_DIR / VERDICT_FILE).unlink(missing_ok=True)  # this failure's: judged now
    return verdict


def log_restarts(run_dir: Path, tracker, journal) -> None:
    """Rank 0 of a start: each restart not logged yet goes to MLflow once (the journal keeps it once even if this
    start is cut off before the ledger is written) and is printed."""
    failures = read_ledger(run_dir)
    restarts = [f for f in failures if f["restarted"]]
    pending = [(n, f) for n, f in enumerate(restarts, 1) if not f.get("logged")]
    if not pending:
        return
    tracker.set_tags({"restarts": len(restarts), **{f"restart.{n}.reason": f["reason"] for n, f in pending}})
    for n, failure in pending:
        print(f"restart {n} of this run: {failure['reason']} (the run had reached global step "
              f"{failure['global_step']})", flush=True)
        journal.log(f"restart {n}", {"run/restarts": float(n)}, step=n)
        failure["logged"] = True
    _write_ledger(run_dir, failures)
