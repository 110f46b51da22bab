"""Time-based mid-epoch checkpoints (``checkpoint.every_minutes``): when one is due, and its save.

Rank 0's clock decides (:meth:`CheckpointClock.due`); the engine carries that in the flags that every rank
agrees on every ``train.sync_every`` steps, so every rank saves at the same step (the save is collective: the
epoch's sums are reduced over ranks, the BN statistics averaged). The state written is the one a stop writes
(``pipeline.train.entry``'s Preempted path), so ``--resume auto`` continues from that step bit-exactly.
"""
from __future__ import annotations

import time
from typing import Callable

SAVE_SECONDS_METRIC = "checkpoint/save_seconds"


class CheckpointClock:
    """Wall time since the last checkpoint of any kind (epoch end, best, stop, timed), on this rank."""

    def __init__(self, every_minutes: float, decides: bool):
        self.every_s = every_minutes * 60.0
        self.decides = decides  # rank 0: the other ranks learn of a due checkpoint from the agreement
        self.last = time.monotonic()

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.decides and self.every_s > 0 and time.monotonic() - self.last >= self.every_s


def save_mid_epoch(trainer, epoch_seconds: float, log_metrics: Callable[[dict, int], None]) -> float:
    """Write ``trainer``'s mid-epoch checkpoint and go on training; returns the seconds the save took (printed
    and logged by rank 0 as ``checkpoint/save_seconds`` at the global step). Collective."""
    started = time.perf_counter()
    live = trainer.meter
    saved = live.summed_over_ranks(trainer.info.device)  # what a stop saves; each rank keeps its own sums
    saved.seconds = live.seconds + epoch_seconds
    trainer.meter = saved
    try:
        trainer.save()
    finally:
        trainer.meter = live
    seconds = time.perf_counter() - started
    if trainer.info.is_main:
        print(f"checkpoint: epoch {trainer.epoch + 1} step {trainer.step_in_epoch} saved to last.pt in "
              f"{seconds:.2f} s (checkpoint.every_minutes)", flush=True)
        log_metrics({SAVE_SECONDS_METRIC: seconds}, trainer.global_step)
    return seconds
