"""Atomic checkpoints: a process killed in the middle of a save leaves the previous file loadable."""
import signal
import subprocess
import sys
import time

import torch

from pipeline.util.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state

WRITER = """
import sys, torch
from pipeline.util.checkpoint import atomic_torch_save
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
