"""What the fault machinery of issue 24 costs, against a training step, side by side in one process.

    .venv/bin/python bench/fault_costs.py                   # the demo model (ResNet-18, 32 px, batch 16), CPU
    .venv/bin/python bench/fault_costs.py --repeats 20

Measured, each as a median over ``--repeats`` alternated rounds (the box's load falls on all alike):
a training step (forward, loss, backward, SGD) of the demo config's model; one checkpoint write as the timed
mid-epoch save makes it (``checkpoint.save_checkpoint`` of the model, optimiser, RNG state: atomic, checksummed);
one heartbeat (the watchdog thread's file write and the read of every rank's file, 2 ranks); the watchdog's
calls in the main thread for one step (``step_begin`` + ``step_done``). Prints each in ms and as a ratio to the
step. The save's cost per hour of training is ``save / (every_minutes x 60 s)``; the heartbeat runs in its own
thread every ``timeout / 10`` s (at most 5 s), not per step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.train import checkpoint as ckpt
from pipeline.train import config as config_lib
from pipeline.train.factory import build_model
from pipeline.train.watchdog import Watchdog


def timed(action, times: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(times):
        action()
    return (time.perf_counter() - started) / times * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    cfg = config_lib.load_config(None, ["method.name=baseline"])
    model = build_model(cfg, 16, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 16, (args.batch,))

    def step():
        loss, _ = model.method.loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as folder:
        watchdogs = [Watchdog(Path(folder), rank, 2, 5.0) for rank in range(2)]
        for watchdog in watchdogs:
            watchdog.folder.mkdir(parents=True, exist_ok=True)
            watchdog._beat()
        path = Path(folder) / "last.pt"
        save = lambda: ckpt.save_checkpoint({"model": model.state_dict(), "training": optimizer.state_dict(),
                                             "rng": ckpt.rng_state()}, path)  # noqa: E731

        def hooks():
            watchdogs[0].step_begin()
            watchdogs[0].step_done(1)

        step()  # warm-up
        rounds = {"step": [], "save": [], "heartbeat": [], "hooks": []}
        for _ in range(args.repeats):
            rounds["step"].append(timed(step, 3))
            rounds["save"].append(timed(save))
            rounds["heartbeat"].append(timed(lambda: (watchdogs[0]._beat(), watchdogs[0]._read()), 20))
            rounds["hooks"].append(timed(hooks, 1000))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    print(f"ResNet-18 demo model, batch {args.batch}, 32 px, CPU, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} rounds")
    for name, ms in medians.items():
        print(f"{name:10s} {ms:10.4g} ms   {ms / medians['step']:9.3g} x a step")


if __name__ == "__main__":
    main()
