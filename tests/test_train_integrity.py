"""What a run records can be trusted: the logged validation metrics are those of the saved model
(2 processes, real gloo), every metric reaches MLflow exactly once through kills during checkpoint
writes, a full disk and re-evaluations (real processes, real SIGKILL, a real SQLite store, a real
tmpfs), and a damaged checkpoint or data set is one line with exit code 2."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.config import REPO_ROOT
from pipeline.train.checkpoint import HOLD_SAVE_ENV, load_checkpoint
from tests.test_checkpoint import flip_byte_inside_a_tensor, mounted_tmpfs
from tests.test_train import _wait_for_line, env, only_run, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow

SMALL = {"model.width_multiplier": 0.25}  # 16x fewer weights: quick saves, same code paths


def every_key_once_per_step(client, run) -> dict[str, list[int]]:
    steps = {}
    for key in run.data.metrics:
        steps[key] = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert len(steps[key]) == len(set(steps[key])), (key, steps[key])  # nothing logged twice
    return steps


def evaluate_saved_model(run_dir: Path) -> dict[str, float]:
    """The run's last.pt evaluated again by this (single) process, as a resume would."""
    from pipeline.train import config as config_lib
    from pipeline.train import entry as train
    from pipeline.train.dist import DistInfo

    cfg = config_lib.load_config(str(run_dir / "config.yaml"), ["tracking.enabled=false"])
    trainer = train.Trainer(cfg, DistInfo(), "auto")
    trainer.setup()
    metrics, _ = trainer.evaluate()
    return metrics


@pytest.mark.parametrize("deterministic", ["true", "false"])  # BN statistics averaged every step / when read
def test_two_process_validation_metrics_are_those_of_the_saved_model(tiny_demo, tmp_path, deterministic):
    overrides = tiny_overrides(tiny_demo, tmp_path, **SMALL, **{"train.ema_decay": 0.9,
                                                                "train.deterministic": deterministic})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tmp_path)
    every_key_once_per_step(client, run)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", "val_ema/"))}
    assert "val/top1/main" in logged and "val_ema/top5/joint" in logged and logged["val/samples"] == 64

    again = evaluate_saved_model(tmp_path / "run")  # one process, the saved BN statistics
    for key, value in logged.items():
        if "/top" in key or key.endswith("samples"):  # counts: exactly the same
            assert again[key] == value, (key, again[key], value)
        else:  # the losses: sums over other batch compositions
            assert again[key] == pytest.approx(value, rel=1e-5), key


BN_RANKS = """
import torch, torch.distributed as dist
from torch import nn
from pipeline.train.dist import average_bn_statistics
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
model(torch.zeros(2, 3, 8, 8))
ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
torch.manual_seed(1 + rank)  # each rank its own images: its own batch statistics
ddp(torch.randn(4, 3, 8, 8) * (1 + rank)).sum().backward()
bn = model[1]
def gathered():
    flat = torch.cat([bn.running_mean, bn.running_var])
    out = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    return out
before = gathered()
assert not torch.equal(before[0], before[1])
average_bn_statistics(model)
after = gathered()
assert all(torch.equal(after[0], a) for a in after)
assert torch.allclose(after[0], sum(before) / world)
if rank == 0:
    print("bn statistics equal on every rank", flush=True)
dist.destroy_process_group()
"""


def test_bn_statistics_are_averaged_over_ranks(tmp_path):
    script = tmp_path / "bn_ranks.py"
    script.write_text(BN_RANKS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=REPO_ROOT, env=dict(env(), PYTHONPATH=str(REPO_ROOT)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bn statistics equal on every rank" in result.stdout


def _run_until_held(args: list[str], hold: str, tmp_path: Path, name: str) -> None:
    """Start a training that stops inside the save `hold` (NAME@N) and SIGKILL it there."""
    flag = tmp_path / f"held-{name}"
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, env=dict(env(), **{HOLD_SAVE_ENV: f"{hold}:{flag}"}),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not flag.exists():
            assert proc.poll() is None, f"{name} exited rc {proc.returncode} before the save {hold}: " + \
                (tmp_path / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} never reached the save {hold}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-save: the temporary is written, not yet renamed
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        log.close()


def test_kills_during_checkpoint_writes_log_every_metric_once(tiny_demo, tmp_path):
    overrides = tiny_overrides(tiny_demo, tmp_path, **SMALL, **{"eval.holdout_fraction": 0.25})
    run_dir = tmp_path / "run"
    # killed while writing the first checkpoint of the run (best.pt of epoch 1): nothing saved
    _run_until_held(overrides, "best.pt@1", tmp_path, "first")
    assert not (run_dir / "last.pt").exists() and list(run_dir.glob(".best.pt.tmp-*"))
    # starts again (same MLflow run), killed while writing epoch 2's last.pt
    _run_until_held(["--resume", "auto", *overrides], "last.pt@2", tmp_path, "second")
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and list(run_dir.glob(".last.pt.tmp-*"))

    finish = subprocess.run(train_cmd("--resume", "auto", *overrides), cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=900)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "removed .last.pt.tmp-" in finish.stdout
    assert not list(run_dir.glob(".*.tmp-*"))  # the killed saves' temporaries are gone
    again = subprocess.run(train_cmd("--resume", "auto", *overrides), cwd=REPO_ROOT, env=env(),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    steps = every_key_once_per_step(client, run)
    assert steps["model/params/total"] == [0]
    assert steps["val/top1/main"] == steps["train/loss"] == [1, 2]
    assert steps["run/wall_seconds"] == [2] and steps["holdout/top1/main"] == [2]  # not again by the re-evaluation


def test_disk_full_at_a_checkpoint_is_one_line_and_the_resume_logs_each_epoch_once(tiny_demo, tmp_path):
    disk = mounted_tmpfs(tmp_path / "disk", "64m")
    try:
        overrides = tiny_overrides(tiny_demo, tmp_path, **SMALL, output_dir=disk / "run")
        stderr_path = tmp_path / "stderr.txt"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(train_cmd(*overrides), cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                                    stderr=stderr, text=True)
            try:
                _wait_for_line(proc, "epoch 2/2 step 1/4", timeout=600)  # epoch 1 is saved
                proc.send_signal(signal.SIGSTOP)
                try:  # the disk fills up before epoch 2's checkpoint
                    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                    with open(disk / "filler", "wb") as filler:
                        os.posix_fallocate(filler.fileno(), 0, free - 64 * 1024)
                finally:
                    proc.send_signal(signal.SIGCONT)
                proc.communicate(timeout=600)
            finally:
                proc.kill()
        assert_one_error_line(proc.returncode, stderr_path.read_text(), [str(disk / "run"), "no space left"])
        assert load_checkpoint(disk / "run" / "last.pt")["epoch"] == 1  # the previous checkpoint, intact
        assert not list((disk / "run").glob(".*.tmp-*"))

        (disk / "filler").unlink()
        resumed = subprocess.run(train_cmd("--resume", "auto", *overrides), cwd=REPO_ROOT, env=env(),
                                 capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client, run = only_run(tmp_path)
        steps = every_key_once_per_step(client, run)
        assert steps["val/top1/main"] == steps["train/loss"] == [1, 2]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


# ----------------------------------------------------------------------------- one line, exit 2


@pytest.fixture(scope="module")
def finished_run(tiny_demo, tmp_path_factory):
    """A finished 1-epoch run (last.pt, best.pt, final_weights.pt) to damage copies of."""
    work = tmp_path_factory.mktemp("finished")
    overrides = tiny_overrides(tiny_demo, work, **SMALL, **{"schedule.epochs": 1})
    result = subprocess.run(train_cmd(*overrides), cwd=REPO_ROOT, env=env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def in_process_main():
    """pipeline.train.entry.main in this process, its process-wide settings put back afterwards."""
    from pipeline.train import entry as train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield train.main
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


def _edit_manifest(data: Path, edit) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


def _data_copy(tiny_demo: Path, tmp_path: Path, damage) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    damage(data)
    return data


# (id, damage the run copy / data copy, extra arguments, what the one line must say)
ONE_LINE_CASES = [
    ("not a checkpoint", None, ["--resume", "{run}/config.yaml"], ["config.yaml", "not a checkpoint"]),
    ("final weights", None, ["--resume", "{run}/final_weights.pt"], ["final_weights.pt", "model weights only"]),
    ("another arch", None, ["--resume", "{run}/last.pt", "model.arch=resnet34"],
     ["last.pt", "model.arch=resnet18", "resnet34"]),
    ("another width", None, ["--resume", "{run}/last.pt", "model.width_multiplier=0.5"],
     ["model.width_multiplier=0.25", "0.5"]),
    ("other groups", None, ["--resume", "{run}/last.pt", "method.num_groups=[2]"], ["[4] groups", "[2]"]),
    ("another method", None, ["--resume", "{run}/last.pt", "method.name=baseline"],
     ["method.name=ssal", "baseline"]),
    ("truncated last.pt", lambda run: _truncate(run / "last.pt"), ["--resume", "auto"],
     ["last.pt: unreadable", "best.pt (epoch 1) is intact"]),
    ("empty last.pt", lambda run: (run / "last.pt").write_bytes(b""), ["--resume", "auto"],
     ["last.pt: empty", "best.pt (epoch 1) is intact"]),
    ("garbled last.pt", lambda run: _garble(run / "last.pt"), ["--resume", "auto"],
     ["last.pt: unreadable", "best.pt (epoch 1) is intact"]),
    ("flipped byte", lambda run: flip_byte_inside_a_tensor(run / "last.pt"), ["--resume", "auto"],
     ["last.pt: checksum mismatch", "best.pt (epoch 1) is intact"]),
]
DATA_CASES = [
    ("manifest without splits", lambda d: _edit_manifest(d, lambda m: m.update(splits={})),
     ["manifest.json", "splits must be a non-empty object"]),
    ("manifest without a val split", lambda d: _edit_manifest(d, lambda m: m["splits"].pop("val")),
     ["manifest.json has no val split", "write_ffcv.py"]),
    ("manifest without betons", lambda d: [(d / n).unlink() for n in ("train.beton", "val.beton")],
     ["train.beton: missing"]),
    ("beton truncated to half", lambda d: _truncate(d / "train.beton"), ["train.beton", "truncated"]),
]


def assert_one_error_line(rc: int, stderr: str, needles: list[str]) -> None:
    """Exit code 2 and one short `error:` line saying `needles` (MLflow's INFO lines may come before)."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: "), (rc, stderr[-3000:])
    assert len(errors[0]) < 600 and stderr.rstrip().endswith(errors[0]), errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize("damage, extra, needles", [c[1:] for c in ONE_LINE_CASES], ids=[c[0] for c in ONE_LINE_CASES])
def test_a_bad_checkpoint_to_resume_is_one_line(tiny_demo, tmp_path, run_copy, in_process_main, capfd, damage, extra,
                                                needles):
    if damage is not None:
        damage(run_copy)
    resume, *overrides = [a.format(run=run_copy) for a in extra[1:]]
    rc = in_process_main(["--resume", resume, *tiny_overrides(tiny_demo, tmp_path, **SMALL, **{"schedule.epochs": 1}),
                          *overrides])
    assert_one_error_line(rc, capfd.readouterr().err, needles)


@pytest.mark.parametrize("damage, needles", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_a_damaged_data_set_is_one_line(tiny_demo, tmp_path, in_process_main, capfd, damage, needles):
    data = _data_copy(tiny_demo, tmp_path, damage)
    rc = in_process_main(tiny_overrides(data, tmp_path, **SMALL))
    assert_one_error_line(rc, capfd.readouterr().err, needles)


def test_a_corrupt_last_checkpoint_exits_2_from_the_command_line(tiny_demo, tmp_path, run_copy):
    _truncate(run_copy / "last.pt")
    result = subprocess.run(train_cmd("--resume", "auto", *tiny_overrides(tiny_demo, tmp_path, **SMALL)),
                            cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert_one_error_line(result.returncode, result.stderr, [str(run_copy / "last.pt"), str(run_copy / "best.pt")])


def test_best_pt_is_a_link_to_last_pt_of_its_epoch_and_outlives_the_next_save(tiny_demo, tmp_path, in_process_main):
    from pipeline.train.checkpoint import load_training_state

    overrides = tiny_overrides(tiny_demo, tmp_path, **SMALL, **{"schedule.epochs": 1})
    assert in_process_main(overrides) == 0
    run_dir = tmp_path / "run"
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    assert os.path.samefile(best, last)  # epoch 1 is the best so far: written once, two names
    first_best = load_training_state(best)
    assert first_best["epoch"] == 1
    assert in_process_main(["--resume", "auto", *overrides, "schedule.epochs=2"]) == 0
    assert load_training_state(last)["epoch"] == 2
    kept = load_training_state(best)  # still loadable after last.pt was saved again
    if kept["epoch"] == 2:  # epoch 2 was better: linked again
        assert os.path.samefile(best, last)
    else:  # the new last.pt was renamed over its name: best.pt keeps epoch 1's file, unchanged
        assert not os.path.samefile(best, last) and best.stat().st_nlink == 1
        assert torch.equal(kept["model"]["backbone.fc.weight"], first_best["model"]["backbone.fc.weight"])
