"""A steady-state training step does not wait for the device (pipeline/train/engine.py train_one_epoch).

On CUDA every call that reads a tensor's value on the host (``item``, ``bool``, ``float``, ``tolist``, ``cpu``,
``nonzero``, a boolean mask...) stalls the GPU until Python has queued the next step. A
``torch.overrides.TorchFunctionMode`` sees those calls on CPU too, so this counts them while the real
``train_one_epoch`` drives every method's training (tiny ResNet-18 at 32 px, no process group: the
all-reduce of the flags is then a no-op, its read is counted all the same). ``.to(device)`` is not counted:
on a CPU run it cannot tell a copy to the host from the no-op it is here; ``cpu()`` is. The GradScaler (fp16) reads its
inf flag every step on CUDA: not counted here (CPU runs in float32; bf16 is the GPU recipes' amp).

And under DDP without ``find_unused_parameters`` (the trainer's setting when train.deterministic is false)
every method must use all its DDP parameters in every step, or DDP fails at the second step.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.train import engine
from tests.step_checks import build_training

SYNC_FREE_CASES = ["baseline", "ssal", "gapcat", "dks", "ds"]
# MAXL's meta step (generator_every = 1: after every multi-task step) reads, every step:
# - pipeline/train/maxl_training.py generator_step: whether some rank's generator gradients were non-finite
#   (then every rank skips the generator's optimiser step): 1 item;
# - ssal_models/maxl_meta.py generator_step: its own finite flag, before writing the gradients: 1 bool;
# - first order only, ssal_models/maxl_meta.py _first_order: the norm of the finite difference's direction,
#   which sets its step size (float twice, isfinite once): 3.
MAXL_SYNCS_PER_META_STEP = {"maxl_first": 5, "maxl_second": 2}
MAXL_CASES = list(MAXL_SYNCS_PER_META_STEP)
SYNC_EVERY = 4
STEPS = 2 * SYNC_EVERY
BATCH, RESOLUTION = 4, 32

# Tensor methods and torch functions that make the host wait for the device on CUDA
SYNCING = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.__complex__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero,
    torch.nonzero, torch.Tensor.argwhere, torch.argwhere, torch.Tensor.masked_select, torch.masked_select,
    torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.equal, torch.allclose, torch.Tensor.allclose,
    torch.Tensor.equal, torch.Tensor.__repr__, torch.Tensor.__format__,
}


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that synchronise host and device on CUDA, by name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncs = func in SYNCING
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            syncs = _bool_index(args[1])  # boolean-mask indexing: the result's size is read on the host
        if syncs:
            name = getattr(func, "__name__", str(func))
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def batches(steps: int):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=generator), torch.arange(BATCH) % 10)
            for _ in range(steps)]


def count_syncs(case: str, steps: int, capsys) -> tuple[SyncCounter, int]:
    """The syncs of `steps` steps of `case` through train_one_epoch (two warm-up steps before, uncounted: the
    optimiser's state is created at its first step), and the number of progress lines it printed (each reads
    the loss: the one at the epoch's end)."""
    model, training = build_training(case, torch.device("cpu"), "none", False, blurpool=False)
    kwargs = dict(start_step=0, lr_factor_at=lambda _: 0.5, stop_requested=lambda: False, sync_every=SYNC_EVERY)
    engine.train_one_epoch(training, batches(2), epoch=0, steps=2, meter=engine.EpochMeter(), global_step=0, **kwargs)
    progress = engine.Progress(True, 1, 2, steps, 0, BATCH, log_every=10 * steps)
    meter, counter = engine.EpochMeter(), SyncCounter()
    capsys.readouterr()
    with counter:
        engine.train_one_epoch(training, batches(steps), epoch=1, steps=steps, meter=meter, global_step=2,
                               progress=progress, **kwargs)
    printed = capsys.readouterr().out.count("loss ")
    assert meter.samples == steps * BATCH and torch.isfinite(torch.as_tensor(meter.loss_sum))
    return counter, printed


@pytest.mark.parametrize("case", SYNC_FREE_CASES)
def test_a_training_step_reads_nothing_from_the_device_between_agreements(case, capsys):
    counter, printed = count_syncs(case, STEPS, capsys)
    assert printed == 1  # the epoch's last step
    assert counter.total <= STEPS // SYNC_EVERY + printed, (case, counter.calls)


@pytest.mark.parametrize("case", MAXL_CASES)
def test_maxl_reads_only_what_its_meta_step_needs(case, capsys):
    counter, printed = count_syncs(case, STEPS, capsys)
    assert counter.total <= STEPS // SYNC_EVERY + printed + STEPS * MAXL_SYNCS_PER_META_STEP[case], (case, counter.calls)


def test_the_counter_sees_what_synchronises():
    x = torch.ones(4)
    with SyncCounter() as counter:
        x.sum().item(), bool(x.any()), float(x[0]), x.tolist(), x[x > 0], x.nonzero(), x.cpu()
        x.sum() * 2, x[1:], torch.isfinite(x).all()  # kernels only
    assert counter.calls == {"item": 1, "__bool__": 1, "__float__": 1, "tolist": 1, "__getitem__": 1,
                             "nonzero": 1, "cpu": 1}, counter.calls


def test_a_non_finite_loss_inside_a_window_raises_non_finite_not_preempted():
    model, training = build_training("baseline", torch.device("cpu"), "none", False)
    data = batches(SYNC_EVERY)
    data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])  # the window's 2nd step
    with pytest.raises(engine.NonFiniteLoss, match=r"epoch 1 step 2 on this rank \(agreed after step 4"):
        engine.train_one_epoch(training, data, epoch=0, steps=SYNC_EVERY, start_step=0, meter=engine.EpochMeter(),
                               global_step=0, lr_factor_at=lambda _: 0.5, stop_requested=lambda: True,
                               sync_every=SYNC_EVERY)


def test_a_stop_is_seen_at_the_next_agreement_and_the_epochs_end_is_always_checked():
    model, training = build_training("baseline", torch.device("cpu"), "none", False)
    done = []
    with pytest.raises(engine.Preempted, match="step 4"):
        engine.train_one_epoch(training, batches(8), epoch=0, steps=8, start_step=0, meter=engine.EpochMeter(),
                               global_step=0, lr_factor_at=lambda _: 0.5, stop_requested=lambda: len(done) >= 2,
                               on_step_end=lambda: done.append(1), sync_every=SYNC_EVERY)
    assert len(done) == 4
    done.clear()
    with pytest.raises(engine.Preempted, match="step 6"):  # 6 steps, windows of 4: the last step agrees too
        engine.train_one_epoch(training, batches(6), epoch=0, steps=6, start_step=0, meter=engine.EpochMeter(),
                               global_step=0, lr_factor_at=lambda _: 0.5, stop_requested=lambda: len(done) >= 5,
                               on_step_end=lambda: done.append(1), sync_every=SYNC_EVERY)


def _ddp_worker(rank: int, init_file: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for case in cases:
            model, training = build_training(case, torch.device("cpu"), "none", False, blurpool=False)
            training.train_model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=False, broadcast_buffers=False, gradient_as_bucket_view=True)
            # DDP finds a parameter that got no gradient in a step at the start of the next one: 2 steps
            engine.train_one_epoch(training, batches(2), epoch=0, steps=2, start_step=0, meter=engine.EpochMeter(),
                                   global_step=0, lr_factor_at=lambda _: 0.5, stop_requested=lambda: False)
    finally:
        dist.destroy_process_group()


def test_every_method_uses_all_its_ddp_parameters_every_step(tmp_path):
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), SYNC_FREE_CASES + MAXL_CASES), nprocs=2,
                       join=True, start_method="spawn")


def _resume_at_epoch_end_worker(rank: int, init_file: str) -> None:
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a mismatched all-reduce fails here, not hangs
    try:
        model, training = build_training("ssal", torch.device("cpu"), "none", False, blurpool=False)
        saved = {"samples": 4, "loss_sum": 8.0, "parts_sum": {"ce/main": 6.0, "ce/group": 2.0}, "seconds": 1.0}
        meter = engine.EpochMeter.resumed(saved, carries_sums=rank == 0)
        # the checkpoint was written after the epoch's last step: the resumed epoch trains nothing
        engine.train_one_epoch(training, batches(2), epoch=0, steps=2, start_step=2, meter=meter, global_step=2,
                               lr_factor_at=lambda _: 0.5, stop_requested=lambda: False)
        metrics = meter.reduced(torch.device("cpu"))
        assert metrics["train/loss"] == 2.0 and metrics["train/ce/main"] == 1.5 and metrics["train/ce/group"] == 0.5
    finally:
        dist.destroy_process_group()


def test_a_resume_at_an_epochs_last_step_reduces_the_same_sums_on_every_rank(tmp_path):
    mp.start_processes(_resume_at_epoch_end_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True,
                       start_method="spawn")
