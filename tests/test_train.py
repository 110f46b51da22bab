"""The training engine end to end on a tiny demo set: real FFCV loaders, real torch.distributed
(gloo, 2 processes under torchrun), a real MLflow SQLite store, real signals."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.train.config import REPO_ROOT

pytestmark = pytest.mark.slow


def tiny_overrides(data_root: Path, work: Path, **extra) -> list[str]:
    values = {
        "data.root": str(data_root), "data.batch_size": 16, "data.val_batch_size": 32, "data.num_workers": 1,
        "data.min_res": 32, "data.max_res": 32, "data.val_res": 32, "runs_root": str(work / "runs"),
        "tracking.experiment": "engine-test", "train.log_every": 1, "method.num_groups": "[4]",
        "schedule.epochs": 2, "schedule.peak_epoch": 1, "train.max_steps_per_epoch": 4,
        "output_dir": str(work / "run"), "train.sync_every": 2,  # a stop is seen inside an epoch of 4 steps
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *args]


def client_for(work: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")


def only_run(work: Path):
    client = client_for(work)
    experiment = client.get_experiment_by_name("engine-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def metric_steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_two_process_gloo_run_logs_every_head(tiny_demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", *tiny_overrides(tiny_demo, tmp_path, **{"train.ema_decay": 0.9,
                                                                            "eval.tta_flip": "true"})]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["method"] == "ssal" and run.data.tags["groups"] == "4"
    assert run.data.params["optim.lr"] == "0.5"
    metrics = run.data.metrics
    for key in ("val/top1/main", "val/top1/joint", "val/top5/main", "val/top5/joint", "val/loss",
                "train/loss", "train/images_per_second"):
        assert key in metrics, sorted(metrics)
        assert [s for s, _ in metrics_steps_sorted(client, run.info.run_id, key)] == [1, 2]
    assert any(k.startswith("val/group_top1/") for k in metrics), sorted(metrics)
    assert metrics["model/params/total"] > metrics["model/params/backbone"] > 0  # SSAL branch params on top
    assert "val_ema/top1/main" in metrics and "val_ema/top1/joint" in metrics  # the EMA weights, as own heads
    # counts are summed over ranks, never averaged or padded: each val image counted once
    assert metrics["val/samples"] == 16 * 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "groupings.json", "confusion_main.npy", "confusion_main.png",
            "accuracy_curves.png", "final_weights.pt"} <= artifacts
    confusion = np.load(tmp_path / "run" / "confusion_main.npy")
    assert confusion.shape == (16, 16) and confusion.sum() == 64 and (confusion.sum(axis=1) == 4).all()
    # the soft confusion of the same images (summed over both ranks): a distribution per class
    assert "confusion_soft_main.npy" in artifacts
    soft = np.load(tmp_path / "run" / "confusion_soft_main.npy")
    assert soft.shape == (16, 16) and np.allclose(soft.sum(axis=1), 1.0, atol=1e-4) and (soft >= 0).all()


def metrics_steps_sorted(client, run_id, key):
    return sorted(metric_steps(client, run_id, key))


def _wait_for_line(proc, needle: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(lines)[-3000:]}")


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_mid_epoch_gives_the_same_weights(tiny_demo, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = subprocess.run(train_cmd(*tiny_overrides(tiny_demo, straight)), cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    proc = subprocess.Popen(train_cmd(*tiny_overrides(tiny_demo, interrupted)), cwd=REPO_ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, "epoch 2/2 step 1/4", timeout=300)
        proc.send_signal(signal.SIGUSR2)  # SLURM's pre-end signal: checkpoint mid-epoch and stop
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 3, rest[-3000:]
    assert "checkpoint saved" in rest
    state = torch.load(interrupted / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and 1 <= state["step_in_epoch"] < 4  # stopped inside epoch 2

    result = subprocess.run(train_cmd("--resume", "auto", *tiny_overrides(tiny_demo, interrupted)), cwd=REPO_ROOT,
                            env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout

    a, b = _weights(straight / "run" / "final_weights.pt"), _weights(interrupted / "run" / "final_weights.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    client, run = only_run(interrupted)  # the resumed job continued the same MLflow run
    assert run.info.status == "FINISHED"
    for key in ("val/top1/main", "train/loss"):
        assert [s for s, _ in metrics_steps_sorted(client, run.info.run_id, key)] == [1, 2]
    for key in run.data.metrics:  # nothing logged twice by the resumed job
        steps = [s for s, _ in metric_steps(client, run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    straight_client, straight_run = only_run(straight)
    assert run.data.metrics["train/loss"] == pytest.approx(straight_run.data.metrics["train/loss"], rel=1e-6)


def test_images_per_second_after_a_two_process_mid_epoch_resume(tiny_demo, tmp_path):
    """The resumed epoch's rate = all ranks' images of the epoch / rank 0's seconds (interrupted part + rest):
    rank 0 carries the other ranks' share of the interrupted part, which must not count world-size times."""
    steps, batch = 6, 16
    overrides = tiny_overrides(tiny_demo, tmp_path, **{"schedule.epochs": 1, "train.max_steps_per_epoch": steps})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pipeline.train"]
    proc = subprocess.Popen(torchrun + overrides, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, f"epoch 1/1 step 1/{steps}", timeout=300)
        for worker in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(worker), signal.SIGUSR2)
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert "checkpoint saved" in rest, rest[-3000:]  # the workers exit 3, torchrun 1
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert 1 <= state["step_in_epoch"] < steps and state["meter"]["samples"] == state["step_in_epoch"] * batch * 2

    result = subprocess.run(torchrun + ["--resume", "auto", *overrides], cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _, run = only_run(tmp_path)
    metrics = run.data.metrics
    assert metrics["train/epoch_seconds"] > state["meter"]["seconds"]  # the interrupted part's time carried on
    assert metrics["train/images_per_second"] == pytest.approx(steps * batch * 2 / metrics["train/epoch_seconds"],
                                                                rel=1e-6)


def test_nan_loss_stops_keeps_last_checkpoint_and_fails_the_run(tiny_demo, tmp_path):
    first = subprocess.run(train_cmd(*tiny_overrides(tiny_demo, tmp_path, **{"schedule.epochs": 1})),
                           cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "run" / "last.pt").read_bytes()
    # continue for a second epoch with an absurd learning rate: the loss overflows
    second = subprocess.run(train_cmd("--resume", "auto", *tiny_overrides(
        tiny_demo, tmp_path, **{"schedule.epochs": 2, "optim.lr": 1e30, "schedule.kind": "cosine"})),
        cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 4, second.stderr[-3000:]
    message = [line for line in second.stderr.splitlines() if "non-finite loss" in line]
    assert message and "epoch 2 step" in message[0]  # counted from 1, as progress and resume and "ce/main=" in message[0]
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # the last good checkpoint, untouched
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"


def test_existing_run_is_not_overwritten_without_resume(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"precious")
    result = subprocess.run(train_cmd(*tiny_overrides(tiny_demo, tmp_path)), cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "already holds a run; pass --resume auto" in result.stderr
    assert (run_dir / "last.pt").read_bytes() == b"precious"


def test_a_rank_that_dies_ends_every_rank(tiny_demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", *tiny_overrides(tiny_demo, tmp_path, **{"schedule.epochs": 50})]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_line(proc, "epoch 1/50 step 2/", timeout=300)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(max(workers, key=int)), signal.SIGKILL)  # one rank dies without a word
        started = time.monotonic()
        rest = proc.communicate(timeout=180)[0]
        assert time.monotonic() - started < 120
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "exitcode" in rest and "-9" in rest  # torchrun names the failed rank and its signal
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True).stdout


def test_training_survives_a_tracking_server_outage(tiny_demo, tmp_path, mlflow_server_factory):
    server = mlflow_server_factory("server")
    overrides = tiny_overrides(tiny_demo, tmp_path, **{"schedule.epochs": 4, "tracking.uri": server.url})
    proc = subprocess.Popen(train_cmd(*overrides), cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, "epoch 1/4  loss", timeout=300)
        server.stop()  # the server dies mid-run (SIGKILL): training goes on
        _wait_for_line(proc, "epoch 3/4  loss", timeout=300)
        proc.send_signal(signal.SIGSTOP)  # hold training while the server restarts on the same port and store
        try:
            server.start()
        finally:
            proc.send_signal(signal.SIGCONT)
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    client = MlflowClient(tracking_uri=server.url)
    runs = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("val/top1/main", "val/top1/joint", "train/loss"):  # epochs logged while down arrive, once each
        assert [s for s, _ in metrics_steps_sorted(client, run.info.run_id, key)] == [1, 2, 3, 4], key
    assert "confusion_main.npy" in {a.path for a in client.list_artifacts(run.info.run_id)}
