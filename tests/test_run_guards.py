"""What a run guarantees when things go wrong (issue 12): one training per run folder, wrong data never
trains, tracking calls are never dropped, stops under several processes end with the stop's code and
one line. Real processes, real signals, real FFCV betons, real MLflow SQLite stores."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.config import REPO_ROOT
from pipeline.tracking.journal import REJECTED_FILE
from pipeline.tracking.sync import main as tracking_main
from pipeline.tracking.tracker import Tracker
from pipeline.train import preemption
from tests.test_train import tiny_overrides

LAUNCH = [sys.executable, str(REPO_ROOT / "pipeline" / "launch.py")]
TRAIN = [sys.executable, "-m", "pipeline.train"]


def overrides(data_root: Path, work: Path, **extra) -> list[str]:
    """test_train's tiny job: baseline, 1 epoch of 1 step unless told otherwise."""
    return tiny_overrides(data_root, work, **{"tracking.experiment": "guards", "method.name": "baseline",
                                              "schedule.epochs": 1, "train.max_steps_per_epoch": 1, **extra})


def env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, cwd=REPO_ROOT, env=kw.pop("env", env()), capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def runs_of(work: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("guards")
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


class Output:
    """A process's merged stdout/stderr, read line by line until a line holds a needle."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []

    def wait_for(self, needle: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if needle in line:
                return
        raise AssertionError(f"never saw {needle!r}:\n{''.join(self.lines)[-3000:]}")

    def rest(self, timeout: float = 300) -> str:
        self.lines.append(self.proc.communicate(timeout=timeout)[0])
        return "".join(self.lines)


def start(cmd, **env_extra) -> Output:
    return Output(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(**env_extra), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))


def start_long_local_run(data_root: Path, work: Path, **env_extra) -> tuple[Output, list[int], list[str]]:
    """`launch.py --local --nproc 2` on a 30-epoch job, once rank 0 reports epoch 1 step 1: the launcher's
    output, its 2 workers' PIDs, the job's overrides. Killed here if it never gets there."""
    ov = overrides(data_root, work, **{"schedule.epochs": 30, "train.max_steps_per_epoch": 4})
    launched = start(LAUNCH + ["--local", "--nproc", "2", *ov], **env_extra)
    try:
        launched.wait_for("epoch 1/30 step 1/4")
        workers = children(launched.proc.pid)
        assert len(workers) == 2, workers
    except BaseException:
        launched.proc.kill()
        raise
    return launched, workers, ov


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


def wait_gone(pids, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), pids


# ----------------------------------------------------------------------------- point 3: one training per folder


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_worker_and_the_folder_is_locked_meanwhile(tiny_demo, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first, workers, ov = start_long_local_run(tiny_demo, tmp_path, TMPDIR=str(tmp))
    try:
        holder = (tmp_path / "run" / "run.lock").read_text().split()[0]
        assert int(holder) in workers  # rank 0 holds the folder

        # a second training of the folder fails at once, through the launcher or the worker entry itself
        for cmd in (LAUNCH + ["--local", "--nproc", "2", "--resume", "auto", *ov], TRAIN + ["--resume", "auto", *ov]):
            started = time.monotonic()
            second = run(cmd, timeout=300)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            line = one_error_line(second)
            assert str(tmp_path / "run") in line and f"PID {holder}" in line and "in use" in line
            assert time.monotonic() - started < 120

        first.proc.send_signal(signal.SIGTERM)
        out = first.rest()
    finally:
        first.proc.kill()
    assert first.proc.returncode == 3, out[-3000:]
    wait_gone(workers, timeout=10)  # the launcher waited for them
    assert "ChildFailedError" not in out and "Traceback" not in out
    stops = [ln for ln in out.splitlines() if ln.startswith("stopped (")]
    assert len(stops) == 1, out[-3000:]
    last_progress = [ln for ln in out.splitlines() if " step " in ln and ln.startswith("epoch ")][-1]
    epoch = last_progress.split()[1].split("/")[0]
    assert f"at epoch {epoch} step" in stops[0], (last_progress, stops)  # counted from 1, as progress
    assert "quasi_random" not in out  # distributed runs take FFCV's distributed order without a warning per rank
    assert not list(tmp.glob("torchelastic_*"))  # torchrun left an empty one per run
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]

    # the folder is free again: the resumed run finishes (epoch 1 of a shortened schedule) in the same MLflow run
    resumed = run(TRAIN + ["--resume", "auto", *overrides(tiny_demo, tmp_path, **{"train.max_steps_per_epoch": 4})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.slow
def test_the_same_training_started_twice_at_once_runs_once(tiny_demo, tmp_path):
    ov = overrides(tiny_demo, tmp_path, **{"schedule.epochs": 2, "train.max_steps_per_epoch": 4})
    both = [start(TRAIN + ov), start(TRAIN + ov)]
    try:
        outs = [b.rest(timeout=600) for b in both]
    finally:
        for b in both:
            b.proc.kill()
    codes = sorted(b.proc.returncode for b in both)
    assert codes == [0, 2], outs
    loser = outs[[b.proc.returncode for b in both].index(2)]
    assert "in use by another training" in loser and str(tmp_path / "run") in loser
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]  # one MLflow run


@pytest.mark.slow
def test_a_killed_launcher_stops_its_workers_and_leaves_no_stale_lock(tiny_demo, tmp_path):
    first, workers, _ = start_long_local_run(tiny_demo, tmp_path)
    try:
        first.proc.kill()  # SIGKILL: nothing in the launcher runs
        first.rest()
        wait_gone(workers, timeout=300)  # the kernel told them (SIGTERM): they checkpointed and stopped
    finally:
        first.proc.kill()
    assert (tmp_path / "run" / "last.pt").is_file()
    # the lock died with its holder: the run continues at once
    resumed = run(TRAIN + ["--resume", "auto", *overrides(tiny_demo, tmp_path, **{"train.max_steps_per_epoch": 4})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_local_run(tiny_demo, tmp_path):
    """What torchrun did for `launch.py --local --nproc N` and the launcher's own supervision now does."""
    first, workers, _ = start_long_local_run(tiny_demo, tmp_path)
    try:
        os.kill(max(workers), signal.SIGKILL)  # one rank dies without a word
        started = time.monotonic()
        out = first.rest(timeout=180)
        assert time.monotonic() - started < 120
    finally:
        first.proc.kill()
    assert first.proc.returncode not in (0, 2, 3), out[-3000:]  # 137 (the dead rank) or 1 (its partner's error)
    assert ": stopping the other ranks" in out
    wait_gone(workers, timeout=10)


# ----------------------------------------------------------------------------- point 7: stops under several processes


@pytest.mark.slow
def test_usr2_to_the_workers_of_a_local_run_is_a_plain_stop(tiny_demo, tmp_path):
    first, workers, _ = start_long_local_run(tiny_demo, tmp_path)
    try:
        for pid in workers:  # as SLURM would signal its tasks; nothing here can requeue
            os.kill(pid, signal.SIGUSR2)
        out = first.rest()
    finally:
        first.proc.kill()
    assert first.proc.returncode == 3, out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out and "requeue pending" not in out
    stops = [ln for ln in out.splitlines() if ln.startswith("stopped (")]
    assert len(stops) == 1 and "--resume auto" in stops[0]
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]  # not left RUNNING: no requeue will continue it


WILL_REQUEUE: list[bool] = []


def preempted_entry(argv: list[str]) -> int:
    """A worker entry for TrainTask: preempted (USR2) at once; records whether the engine would leave the run
    open for a requeue."""
    preemption.request(preemption.PREEMPT)
    WILL_REQUEUE.append(preemption.will_requeue())
    return 0


@pytest.mark.parametrize("slurm_env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}, True),
    ({"SLURM_RESTART_COUNT": "0"}, False),  # not a SLURM job: nothing will requeue
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"}, False),  # max_requeues reached
])
def test_only_a_slurm_task_that_can_requeue_leaves_a_preempted_run_open(monkeypatch, slurm_env, expected):
    from pipeline.launch.task import TrainTask

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    WILL_REQUEUE.clear()
    try:
        TrainTask(argv=[], entry="tests.test_run_guards:preempted_entry", max_requeues=3, export_torch_env=False)()
    finally:
        preemption.reset()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert WILL_REQUEUE == [expected]


# ----------------------------------------------------------------------------- point 4: wrong data never trains


@pytest.fixture(scope="module")
def other_seed_demo(tmp_path_factory):
    """The tiny demo written with another seed: same classes, counts and file sizes, other images."""
    out = tmp_path_factory.mktemp("other_seed") / "demo"
    subprocess.run([sys.executable, str(REPO_ROOT / "datasets" / "write_ffcv.py"), "demo", "--out", str(out),
                    "--num-classes", "16", "--num-superclasses", "4", "--images-per-class", "12",
                    "--val-images-per-class", "4", "--image-size", "32", "--workers", "2", "--seed", "1"],
                   check=True, capture_output=True, timeout=600)
    return out


def mixed_folder(tmp_path: Path, manifest_from: Path, train_beton: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(manifest_from / "manifest.json", folder)
    shutil.copy(manifest_from / "val.beton", folder)
    shutil.copy(train_beton, folder / "train.beton")
    return folder


def test_betons_of_another_seed_are_refused_before_training(tiny_demo, other_seed_demo, tmp_path):
    assert (tiny_demo / "train.beton").stat().st_size == (other_seed_demo / "train.beton").stat().st_size
    data = mixed_folder(tmp_path, tiny_demo, other_seed_demo / "train.beton")
    result = run(TRAIN + overrides(data, tmp_path))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = one_error_line(result)
    assert str(data / "train.beton") in line and "quick_sha256" in line and "write_ffcv.py" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_beton_with_other_counts_is_refused_before_training(tiny_demo, tmp_path):
    data = mixed_folder(tmp_path, tiny_demo, tiny_demo / "val.beton")  # 64 images where 192 are recorded
    result = run(TRAIN + overrides(data, tmp_path))
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(data / "train.beton") in line and "manifest.json says" in line


def test_a_dataset_name_other_than_the_manifests_is_refused(tiny_demo, tmp_path):
    result = run(TRAIN + overrides(tiny_demo, tmp_path, **{"data.dataset": "imagenet"}))
    assert result.returncode == 2
    line = one_error_line(result)
    assert "data.dataset" in line and "'demo'" in line and "data.dataset=demo" in line


def test_quick_check_reads_old_manifests_and_verify_keeps_the_full_hash(tiny_demo, other_seed_demo, tmp_path):
    from ssal_datasets.manifest import quick_check, read_manifest
    from ssal_datasets.writer import verify

    manifest = read_manifest(tiny_demo)
    assert quick_check(tiny_demo, manifest) == []
    legacy = json.loads(json.dumps(manifest))
    for split in legacy["splits"].values():  # written before `bytes` / `quick_sha256`
        split.pop("quick_sha256")
        split.pop("bytes")
    assert quick_check(tiny_demo, legacy) == []
    data = mixed_folder(tmp_path, tiny_demo, other_seed_demo / "train.beton")
    assert quick_check(data, legacy) == []  # what an old manifest cannot tell apart ...
    assert any("sha256 mismatch" in p for p in verify(data, log=lambda *a: None))  # ... verify does


# ----------------------------------------------------------------------------- point 5: tracking never lost


@pytest.mark.parametrize("uri, hint", [("htp://127.0.0.1:5000", "did you mean http://127.0.0.1:5000"),
                                       ("127.0.0.1:5000", "tracking.uri=http://127.0.0.1:5000")])
def test_a_mistyped_tracking_uri_is_refused_before_training(tiny_demo, tmp_path, uri, hint):
    for cmd in (TRAIN, LAUNCH + ["--local"]):
        result = run(cmd + overrides(tiny_demo, tmp_path, **{"tracking.uri": uri}), timeout=300)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        line = one_error_line(result)
        assert "tracking.uri" in line and hint in line
        assert not (tmp_path / "run").exists()


def test_a_call_the_store_refuses_is_kept_for_sync(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    tracker = Tracker(uri, "guards", str(run_dir))
    run_id = tracker.start("r", {"a": 1}, {})
    client = MlflowClient(tracking_uri=uri)
    client.delete_run(run_id)  # someone deletes the run in the UI while it trains: the store refuses its calls
    tracker.log_metrics({"val/top1/main": 0.5}, step=1)
    tracker.end("FINISHED")
    kept = [json.loads(line) for line in (run_dir / REJECTED_FILE).read_text().splitlines()]
    assert [op["op"] for op in kept][:1] == ["metrics"] and kept[0]["rejected"]

    assert tracking_main(["sync", str(run_dir)]) == 1  # still deleted: refused again, still kept
    assert (run_dir / REJECTED_FILE).is_file()
    client.restore_run(run_id)
    assert tracking_main(["sync", str(run_dir)]) == 0
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/top1/main")] == [(1, 0.5)]
    assert not (run_dir / REJECTED_FILE).exists()


def test_a_store_that_refuses_everything_loses_nothing(tmp_path):
    """A tracker given a URI no store takes (past the config check: the API, an old run's state) keeps every
    call; `sync --uri` puts the whole run into a working store."""
    run_dir = tmp_path / "run"
    tracker = Tracker("htp://127.0.0.1:5000", "guards", str(run_dir))
    tracker.start("r", {"optim.lr": 0.1}, {"method": "baseline"})
    for step in (1, 2):
        tracker.log_metrics({"val/top1/main": 0.1 * step}, step=step)
    tracker.end("FINISHED")
    assert (run_dir / REJECTED_FILE).is_file()
    good = f"sqlite:///{tmp_path / 'good.db'}"
    assert tracking_main(["sync", str(run_dir), "--uri", good]) == 0
    client = MlflowClient(tracking_uri=good)
    (run,) = client.search_runs([client.get_experiment_by_name("guards").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1/main")] == [1, 2]


# ----------------------------------------------------------------------------- point 8: the command line


def test_overrides_after_resume_are_accepted(tiny_demo, tmp_path):
    ov = overrides(tiny_demo, tmp_path)
    result = run(TRAIN + [*ov[:-1], "--resume", "auto", ov[-1], "tracking.run_name=after-resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    assert [r.info.run_name for r in runs] == ["after-resume"]
