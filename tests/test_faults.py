"""Faults that come without a stop signal (issue 24): a run killed after a time-based mid-epoch checkpoint
resumes from that step to the same weights, and a hung rank ends the job in seconds with one line and its
stacks. Real processes (`launch.py --local --nproc 2`, gloo), real SIGKILL / SIGSTOP, real FFCV betons,
a real MLflow SQLite store."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoint_clock import SAVE_SECONDS_METRIC
from pipeline.train.exit_codes import EXIT_HUNG
from pipeline.train.watchdog import HANG_HOLD_ENV, HEARTBEAT_DIR, find_hung
from tests.test_run_guards import LAUNCH, children, overrides, run, runs_of, start, wait_gone
from tests.test_train import _weights

HANG_TIMEOUT_S = 5


def job(data_root: Path, work: Path, **extra) -> list[str]:
    """2 epochs of 4 steps, flags agreed every 2 steps, deterministic (the default)."""
    return overrides(data_root, work, **{"schedule.epochs": 2, "train.max_steps_per_epoch": 4, **extra})


def heartbeat(work: Path, rank: int) -> dict:
    return json.loads((work / "run" / HEARTBEAT_DIR / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def undisturbed(tiny_demo, tmp_path_factory) -> dict:
    """The final weights of `job` run without a fault (2 ranks, deterministic)."""
    work = tmp_path_factory.mktemp("undisturbed")
    result = run(LAUNCH + ["--local", "--nproc", "2", *job(tiny_demo, work)])
    assert result.returncode == 0, result.stderr[-3000:]
    return _weights(work / "run" / "final_weights.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_run_killed_after_a_timed_checkpoint_resumes_from_that_step_to_the_same_weights(tiny_demo, tmp_path,
                                                                                           undisturbed):
    killed = tmp_path / "killed"

    timed = job(tiny_demo, killed, **{"checkpoint.every_minutes": 0.001})  # due at every agreement
    # rank 0 blocks after global step 7 (epoch 2 step 3), past the timed save at epoch 2 step 2
    launched = start(LAUNCH + ["--local", "--nproc", "2", *timed], **{HANG_HOLD_ENV: "0@7"})
    try:
        launched.wait_for("checkpoint: epoch 2 step 2 saved to last.pt in")
        workers = children(launched.proc.pid)
        assert len(workers) == 2, workers
        deadline = time.monotonic() + 120  # until rank 0 holds
        while time.monotonic() < deadline and heartbeat(killed, 0)["step"] != 7:
            time.sleep(0.2)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # a hard failure: nothing is saved now
        out = launched.rest(timeout=120)
    finally:
        launched.proc.kill()
    wait_gone(workers, timeout=30)
    assert launched.proc.returncode not in (0, 2, 3), out[-3000:]
    printed = [ln for ln in out.splitlines() if ln.startswith("checkpoint: ")]
    assert any(ln.startswith("checkpoint: epoch 1 step 2 saved to last.pt in ") for ln in printed), out[-3000:]
    assert any(ln.startswith("checkpoint: epoch 2 step 2 saved to last.pt in ") for ln in printed), out[-3000:]
    assert all(ln.endswith(" s (checkpoint.every_minutes)") for ln in printed), printed
    state = torch.load(killed / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)  # mid-epoch 2, not its start

    resumed = run(LAUNCH + ["--local", "--nproc", "2", "--resume", "auto", *timed])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epoch 2 step 2" in resumed.stdout, resumed.stdout[-3000:]
    assert_same_weights(undisturbed, _weights(killed / "run" / "final_weights.pt"))

    client, runs = runs_of(killed)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    costs = client.get_metric_history(runs[0].info.run_id, SAVE_SECONDS_METRIC)
    assert costs and all(m.value > 0 for m in costs)


def _hung_job(tiny_demo: Path, work: Path, **env_extra):
    ov = overrides(tiny_demo, work, **{"schedule.epochs": 30, "train.max_steps_per_epoch": 4,
                                        "train.hang_timeout_s": HANG_TIMEOUT_S})
    return start(LAUNCH + ["--local", "--nproc", "2", *ov], **env_extra)


def _hang_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error: hang: ")]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_in_seconds_with_one_line_and_its_stacks(tiny_demo, tmp_path):
    launched = _hung_job(tiny_demo, tmp_path)
    try:
        launched.wait_for("epoch 1/30 step 2/4")
        stopped = heartbeat(tmp_path, 1)["pid"]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        launched.wait_for("error: hang: ", timeout=120)
        detected_s = time.monotonic() - stopped_at
        os.kill(stopped, signal.SIGCONT)  # its pending SIGUSR1 dumps its threads now
        out = launched.rest(timeout=120)
    finally:
        launched.proc.kill()
    assert launched.proc.returncode == EXIT_HUNG, out[-3000:]
    assert detected_s < HANG_TIMEOUT_S + 15, detected_s
    lines = _hang_lines(out)
    assert len(lines) == 1, out[-3000:]
    assert f"rank 1 on {os.uname().nodename} (pid {stopped})" in lines[0] and "after finishing global step" in lines[0]
    assert "not answering" in lines[0] and f"(train.hang_timeout_s {HANG_TIMEOUT_S} s)" in lines[0], lines[0]
    assert "most recent call first" in out and "train_one_epoch" in out, out[-3000:]  # faulthandler's dump


@pytest.mark.slow
def test_a_rank_stuck_in_python_ends_the_job_with_one_line_and_the_stuck_frame(tiny_demo, tmp_path):
    launched = _hung_job(tiny_demo, tmp_path, **{HANG_HOLD_ENV: "1@3"})  # rank 1 blocks after global step 3
    try:
        launched.wait_for("epoch 1/30 step 3/4")
        seen_at = time.monotonic()
        out = launched.rest(timeout=120)
    finally:
        launched.proc.kill()
    assert launched.proc.returncode == EXIT_HUNG, out[-3000:]
    assert time.monotonic() - seen_at < HANG_TIMEOUT_S + 20
    lines = _hang_lines(out)
    assert len(lines) == 1, out[-3000:]
    assert "rank 1 on " in lines[0] and "after finishing global step 3," in lines[0] and "stuck between steps" in lines[0]
    assert f"(train.hang_timeout_s {HANG_TIMEOUT_S} s)" in lines[0], lines[0]
    dump = out[out.index("rank 1: hung after global step 3; its threads:"):]
    assert "in step_done" in dump and "hang-watchdog" not in lines[0], dump[-3000:]


def test_the_hung_rank_is_the_silent_one_or_the_one_between_steps():
    now, timeout = 100.0, 5.0

    def beat(rank, step, phase, progress_at=80.0, beat_at=99.0):
        return {"rank": rank, "host": "h", "pid": rank, "step": step, "progress_at": progress_at, "phase": phase,
                "timeout": timeout, "beat_at": beat_at}

    waiting = beat(0, 4, "step")
    assert find_hung([waiting, beat(1, 3, "host")], now) == (beat(1, 3, "host"), True)
    assert find_hung([waiting, beat(1, 4, "step", beat_at=90.0)], now) == (beat(1, 4, "step", beat_at=90.0), False)
    assert find_hung([waiting, beat(1, 3, "idle")], now) is None  # evaluating or saving: the others wait for it
    assert find_hung([beat(0, 5, "step", progress_at=97.0), beat(1, 4, "host", progress_at=98.0)], now) is None  # progress
    assert find_hung([beat(0, 4, "step", beat_at=10.0), beat(1, 4, "done", beat_at=10.0)], now)[0]["rank"] == 0
    assert find_hung([{**waiting, "timeout": None}], now) is None  # auto timeout not known yet
    assert find_hung([waiting, beat(1, 4, "step", beat_at=97.0)], now) is None  # stopped lately: named when silent


NAMED_BY_A_VERDICT = """
import json, sys, time
from pathlib import Path
from pipeline.train.watchdog import HEARTBEAT_DIR, VERDICT_FILE, Watchdog
run_dir, signalled = Path(sys.argv[1]), sys.argv[2] == "1"
(run_dir / HEARTBEAT_DIR).mkdir(parents=True)
(run_dir / HEARTBEAT_DIR / VERDICT_FILE).write_text(json.dumps(
    {"rank": 1, "host": "other", "pid": 0, "answering": True, "signalled": signalled, "seen_by": 0}))
dog = Watchdog(run_dir, rank=1, world_size=2, hang_timeout_s=1.0)
dog.start(global_step=7)
time.sleep(60)
"""


@pytest.mark.parametrize("signalled", [False, True])
def test_the_rank_a_verdict_names_dumps_its_stacks_unless_the_reporter_signalled_it(tmp_path, signalled):
    """Another rank saw the hang first (its verdict names this one): this one's stacks are on its stderr, from
    its own watchdog, or from the SIGUSR1 the reporter sent (then the watchdog does not dump them twice)."""
    done = subprocess.run([sys.executable, "-c", NAMED_BY_A_VERDICT, str(tmp_path), str(int(signalled))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_HUNG, done.stderr[-2000:]
    dumped = "rank 1: hung after global step 7; its threads:" in done.stderr
    assert dumped != signalled, done.stderr[-2000:]
    if dumped:
        assert "most recent call first" in done.stderr and "<string>" in done.stderr, done.stderr[-2000:]


def _restarted_after(fault, tiny_demo: Path, work: Path) -> tuple[str, float]:
    """`launch.py --local --nproc 2 --max-restarts 2` on `job`; `fault(pid of rank 1)` in epoch 2 (epoch 1 is
    checkpointed). The launcher's output, and the seconds from the fault to the first step after the restart."""
    ov = job(tiny_demo, work, **{"train.hang_timeout_s": HANG_TIMEOUT_S})
    launched = start(LAUNCH + ["--local", "--nproc", "2", "--max-restarts", "2", *ov])
    try:
        launched.wait_for("epoch 2/2 step 1/4")
        fault(heartbeat(work, 1)["pid"])
        fault_at = time.monotonic()
        launched.wait_for("resumed from ", timeout=180)
        launched.wait_for("epoch 2/2 step 1/4", timeout=180)
        seconds = time.monotonic() - fault_at
        out = launched.rest(timeout=300)
    finally:
        launched.proc.kill()
    assert launched.proc.returncode == 0, out[-3000:]
    print(f"fault to the first step after the restart: {seconds:.1f} s")
    return out, seconds


def assert_restarted_once(work: Path, out: str, reason: str, undisturbed: dict) -> None:
    restarts = [ln for ln in out.splitlines() if ln.startswith("[launch] restart ")]
    assert len(restarts) == 1 and restarts[0].startswith(f"[launch] restart 1/2: {reason}"), out[-3000:]
    assert "resumed from " in out and "epoch 2 step 0" in out  # the end of epoch 1's checkpoint
    assert_same_weights(undisturbed, _weights(work / "run" / "final_weights.pt"))
    client, runs = runs_of(work)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["restarts"] == "1" and run.data.tags["restart.1.reason"].startswith(reason)
    for key in run.data.metrics:  # every metric once per step, the restart's included
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "run/restarts")] == [1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1/main")] == [1, 2]


@pytest.mark.slow
def test_a_killed_local_worker_is_restarted_and_the_run_ends_as_an_undisturbed_one(tiny_demo, tmp_path, undisturbed):
    out, _ = _restarted_after(lambda pid: os.kill(pid, signal.SIGKILL), tiny_demo, tmp_path)
    assert_restarted_once(tmp_path, out, "rank 1 killed by SIGKILL", undisturbed)


@pytest.mark.slow
def test_a_hung_local_worker_is_restarted_and_the_run_ends_as_an_undisturbed_one(tiny_demo, tmp_path, undisturbed):
    out, _ = _restarted_after(lambda pid: os.kill(pid, signal.SIGSTOP), tiny_demo, tmp_path)
    assert len(_hang_lines(out)) == 1, out[-3000:]
    assert_restarted_once(tmp_path, out, "hang: rank 1 on ", undisturbed)
