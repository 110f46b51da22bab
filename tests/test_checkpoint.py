"""Atomic, checksummed checkpoints: a process killed in the middle of a save (or a full disk) leaves
the previous file loadable; a damaged file is one line naming it; the next run removes the
temporaries of killed saves."""
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import (HOLD_SAVE_ENV, CheckpointError, atomic_torch_save, content_checksum,
                                      load_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint,
                                      set_rng_state, to_cpu)

WRITER = """
import sys, torch
from pipeline.train.checkpoint import atomic_torch_save
path = sys.argv[1]
print("ready", flush=True)
i = 0
while True:  # ~40 MB per save: a kill lands mid-write most of the time
    i += 1
    atomic_torch_save({"step": i, "w": torch.full((10_000_000,), float(i))}, path)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 0, "w": torch.zeros(10_000_000)}, path)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = load_checkpoint(path)  # never a torn file under the final name
        assert torch.all(state["w"] == float(state["step"]))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    # a killed writer may leave its temp file behind, never a second final-named file
    assert all(name.startswith(".last.pt.tmp-") for name in leftovers)


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_the_next_run_removes_temporaries_of_killed_saves(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 0}, path)
    for name in ("last.pt", "best.pt"):  # a writer killed (SIGKILL) while it writes each file
        flag = tmp_path / f"held-{name}"
        proc = subprocess.Popen([sys.executable, "-c", HELD_WRITER, str(tmp_path / name)],
                                env=dict(os.environ, **{HOLD_SAVE_ENV: f"{name}@1:{flag}"}))
        _wait_for(flag.exists, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = sorted(p.name for p in tmp_path.glob(".*.pt.tmp-*"))
    assert len(leftovers) == 2 and leftovers[0].startswith(".best.pt.tmp-")
    mine = tmp_path / f".last.pt.tmp-{os.getpid()}"  # a live process's temporary is not touched
    mine.write_bytes(b"in progress")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == leftovers
    assert mine.exists() and load_checkpoint(path) == {"step": 0}


HELD_WRITER = """
import sys, torch
from pipeline.train.checkpoint import atomic_torch_save
atomic_torch_save({"w": torch.ones(1000)}, sys.argv[1])
"""


def _wait_for(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the writer exited (rc {proc.returncode}) before holding its save"
        assert time.monotonic() < deadline, "the writer never held its save"
        time.sleep(0.05)


def flip_byte_inside_a_tensor(path) -> None:
    """Flip one byte in the middle of the largest tensor storage record of a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_inside_a_tensor_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 3, "rng": rng_state()}
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)  # intact: loads, without the checksum key
    assert loaded.keys() == state.keys() and torch.equal(loaded["model"]["w"], state["model"]["w"])
    flip_byte_inside_a_tensor(path)
    assert torch.load(path, weights_only=False)["epoch"] == 3  # torch itself does not notice
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "checksum" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled", "text"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(50_000)}, "epoch": 1}, path)
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2],
               "garbled": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)) + data[4096:],
               "text": b"data:\n  root: x\n"}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 400, message


def mounted_tmpfs(folder, size: str):
    """`folder`, a new tmpfs of `size` (the caller unmounts it); skips unless root can mount one."""
    if os.geteuid() != 0:
        pytest.skip("filling a disk needs a small tmpfs, and mounting one needs root")
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    return folder


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    folder = mounted_tmpfs(tmp_path / "small", "4m")
    try:
        path = folder / "last.pt"
        save_checkpoint({"model": {"w": torch.ones(250_000)}, "epoch": 1}, path)  # 1 MB of 4
        with pytest.raises(CheckpointError) as err:
            save_checkpoint({"model": {"w": torch.ones(1_000_000)}, "epoch": 2}, path)  # 4 MB more: full
        message = str(err.value)
        assert "no space left" in message and str(path) in message and "\n" not in message, message
        assert load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in folder.iterdir()] == ["last.pt"]  # the partial temporary is gone
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _model_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).state_dict(),
            "epoch": seed, "rng": rng_state()}


def test_best_linked_to_last_survives_the_next_atomic_save_of_last(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    epoch1 = _model_state(1)
    save_checkpoint(epoch1, best, also=[last])  # the trainer's order: best.pt written, last.pt linked to it
    assert os.path.samefile(best, last) and best.stat().st_nlink == 2
    assert load_checkpoint(last)["epoch"] == load_checkpoint(best)["epoch"] == 1
    save_checkpoint(_model_state(2), last)  # the next epoch, not a better one: a new file renamed over last.pt
    assert not os.path.samefile(best, last) and best.stat().st_nlink == 1
    kept = load_checkpoint(best)  # the rename replaced last.pt's entry; best.pt still holds epoch 1, intact
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["0.weight"], epoch1["model"]["0.weight"])
    assert load_checkpoint(last)["epoch"] == 2
    save_checkpoint(_model_state(3), best, also=[last])  # a better epoch 3: both names on its file again
    assert os.path.samefile(best, last) and load_checkpoint(last)["epoch"] == 3
    save_checkpoint(_model_state(3), best, also=[last])  # linking two names of one file again leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_the_state_is_saved_from_one_cpu_copy_that_keeps_the_state_dict_metadata(tmp_path):
    state = _model_state(0)
    copy = to_cpu(state)
    assert copy["model"]._metadata == state["model"]._metadata  # BatchNorm's version, read by load_state_dict
    assert all(copy["model"][k].data_ptr() == v.data_ptr() for k, v in state["model"].items())  # CPU: no copy
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["model"]._metadata == state["model"]._metadata
    torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).load_state_dict(loaded["model"])
    assert content_checksum(loaded) == content_checksum(state)
