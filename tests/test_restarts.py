"""The restart decision and its ledger (pipeline.train.restarts), the SLURM batch script's side of it
(pipeline.launch.task: exit codes left by the tasks, the teardown lines) and the local launcher's argv.
The restarts themselves, on real processes and the real SLURM test cluster: tests/test_faults.py."""
import json
import signal
from pathlib import Path

import pytest

from pipeline.launch import task as task_lib
from pipeline.launch.cli import resuming
from pipeline.train import restarts
from pipeline.train.exit_codes import EXIT_HUNG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USAGE
from pipeline.train.watchdog import HEARTBEAT_DIR, VERDICT_FILE


def beats(run_dir: Path, *steps: int) -> None:
    folder = run_dir / HEARTBEAT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for rank, step in enumerate(steps):
        (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "step": step}))


def test_a_killed_rank_is_restarted_until_max_restarts(tmp_path):
    beats(tmp_path, 5, 6)
    first = restarts.decide(tmp_path, {0: 1, 1: -signal.SIGKILL}, max_restarts=2, job="j")
    assert first.restart and first.number == 1
    assert first.line == ("restart 1/2: rank 1 killed by SIGKILL (the run had reached global step 6); starting again "
                          "from the last checkpoint")
    beats(tmp_path, 9, 9)
    assert restarts.decide(tmp_path, {0: None, 1: 1}, max_restarts=2, job="j").restart  # progress since: again
    beats(tmp_path, 12, 12)
    third = restarts.decide(tmp_path, {0: None, 1: 1}, max_restarts=2, job="j")
    assert not third.restart and "the 2 restart(s) allowed (max_restarts 2) are used" in third.line
    assert "rank 0 gone without an exit code" in third.line  # a rank without a code is the cause, not its partner
    # another job of the same run (a resubmission) has restarts of its own
    beats(tmp_path, 15, 15)
    assert restarts.decide(tmp_path, {0: 1, 1: 1}, max_restarts=2, job="k").restart
    ledger = restarts.read_ledger(tmp_path)
    assert [f["global_step"] for f in ledger] == [6, 9, 12, 15]
    assert [f["restarted"] for f in ledger] == [True, True, False, True]


def test_among_ranks_that_failed_alike_the_first_to_end_is_named(tmp_path):
    # rank 1 raised; rank 0 then failed on the closed connection, with the same exit code
    assert restarts.failure_reason(tmp_path, {0: 1, 1: 1}, {0: 100.5, 1: 100.0}) == "rank 1 exited with code 1"
    assert restarts.failure_reason(tmp_path, {0: 1, 1: -15, 2: 1}, {}) == "rank 0 exited with code 1"  # SIGTERM: last


def test_a_failure_at_the_same_step_twice_in_a_row_is_not_restarted(tmp_path):
    beats(tmp_path, 7, 7)
    assert restarts.decide(tmp_path, {0: 1, 1: 1}, max_restarts=5, job="j").restart
    again = restarts.decide(tmp_path, {0: 1, 1: 1}, max_restarts=5, job="j")
    assert not again.restart
    assert again.line.startswith("not restarting: failed again at global step 7 with no progress since the previous")


@pytest.mark.parametrize("code", [EXIT_USAGE, EXIT_NONFINITE, EXIT_PREEMPTED])
def test_the_users_failures_are_not_restarted_nor_counted(tmp_path, code):
    beats(tmp_path, 3, 3)
    verdict = restarts.decide(tmp_path, {0: code, 1: -signal.SIGTERM}, max_restarts=3, job="j")
    assert not verdict.restart and verdict.line.startswith(f"not restarting: rank 0 exited with code {code} (")
    assert restarts.read_ledger(tmp_path) == []


def test_a_hang_is_named_from_the_watchdogs_verdict_which_is_then_judged(tmp_path):
    beats(tmp_path, 4, 3)
    verdict_file = tmp_path / HEARTBEAT_DIR / VERDICT_FILE
    verdict_file.write_text(json.dumps({"rank": 1, "host": "n2", "step": 3}))
    verdict = restarts.decide(tmp_path, {0: EXIT_HUNG, 1: None}, max_restarts=3, job="j")
    assert verdict.restart and "hang: rank 1 on n2 made no progress after global step 3" in verdict.line
    assert not verdict_file.exists()
    assert restarts.describe_exit(EXIT_HUNG) == "exited with code 5 (hung)"
    assert restarts.describe_exit(128 + signal.SIGKILL) == "killed by SIGKILL"


class Recorder:
    def __init__(self):
        self.tags, self.metrics = {}, []

    def set_tags(self, tags):
        self.tags.update(tags)

    def log(self, key, metrics, step):
        self.metrics.append((key, metrics, step))


def test_each_restart_is_logged_once(tmp_path, capsys):
    beats(tmp_path, 2, 2)
    restarts.decide(tmp_path, {0: -9, 1: 1}, max_restarts=3, job="j")
    recorder = Recorder()
    restarts.log_restarts(tmp_path, recorder, recorder)
    restarts.log_restarts(tmp_path, recorder, recorder)  # the next start: nothing new
    assert recorder.metrics == [("restart 1", {"run/restarts": 1.0}, 1)]
    assert recorder.tags == {"restarts": 1, "restart.1.reason": "rank 0 killed by SIGKILL"}
    assert capsys.readouterr().out.count("restart 1 of this run: rank 0 killed by SIGKILL (the run had reached "
                                         "global step 2)") == 1


def test_slurm_tasks_leave_exit_codes_for_the_batch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    task_lib.write_exit(tmp_path, 0, EXIT_HUNG)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    task_lib.write_exit(tmp_path, 1, 1)  # an earlier start's: not this one's
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    codes, ended_at = task_lib.read_exits(tmp_path, 3)
    assert codes == {0: EXIT_HUNG, 1: None, 2: None} and list(ended_at) == [0]
    assert not list((tmp_path / HEARTBEAT_DIR).glob("exit-rank*"))  # consumed


def test_the_batch_scripts_teardown_decides_after_srun():
    lines = task_lib.teardown_command("/venv/bin/python", 4, 3, ["/runs/a b"])
    assert lines[0] == "srun_exit=$?" and lines[-1] == "exit $srun_exit"
    assert lines[1] == "/venv/bin/python -m pipeline.launch.task --srun-exit $srun_exit --ntasks 4 --max-restarts 3 '/runs/a b'"
    assert task_lib.teardown_main(["--srun-exit", "0", "--ntasks", "2", "--max-restarts", "3", "/nowhere"]) == 0


def test_a_local_restart_resumes_auto():
    assert resuming(["--config", "c.yaml", "--resume", "/x/last.pt", "a=1"]) == ["--resume", "auto", "--config",
                                                                                 "c.yaml", "a=1"]
    assert resuming(["a=1"]) == ["--resume", "auto", "a=1"]
