"""The training and evaluation loops. Method-agnostic: everything method-specific goes
through the model's method object (`loss`, `predict`, `extra_metrics`, see ssal_models).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.train import dist as dist_util


class NonFiniteLoss(RuntimeError):
    """A NaN/Inf loss: training stops, the last good checkpoint is kept."""


class Preempted(Exception):
    """The job was asked to stop (SLURM pre-end signal / scancel); a checkpoint is due."""


def autocast_context(device: torch.device, amp: str):
    """Autocast on the model's device (the trainer sets amp "none" for CPU runs; the
    tests run the same code under CPU autocast, tests/step_checks.py)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class EpochMeter:
    """Sums of a training epoch, kept in the checkpoint so a mid-epoch resume logs the full epoch.

    The loss sums stay on the model's device (a float after a resume or a reduction): adding a step's loss
    is a kernel, not a host-device synchronisation; they become floats when reduced or checkpointed."""
    samples: int = 0
    loss_sum: float | torch.Tensor = 0.0
    parts_sum: dict[str, float | torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def update(self, batch: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.samples += batch
        self.loss_sum = self.loss_sum + loss.detach().double() * batch
        for name, value in parts.items():
            self.parts_sum[name] = self.parts_sum.get(name, 0.0) + value.detach().double() * batch

    def summed_over_ranks(self, device: torch.device) -> "EpochMeter":
        """The sums of every rank, as floats (for a mid-epoch checkpoint, which only rank 0 writes).
        Collective: every rank must call it. `seconds` stays this rank's."""
        names = sorted(self.parts_sum)
        sums = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device).reshape(())
                            for value in [self.samples, self.loss_sum] + [self.parts_sum[n] for n in names]])
        dist_util.all_reduce_sum(sums)
        values = sums.tolist()
        return EpochMeter(samples=int(values[0]), loss_sum=values[1],
                          parts_sum={n: values[2 + i] for i, n in enumerate(names)}, seconds=self.seconds)

    def reduced(self, device: torch.device) -> dict[str, float]:
        """Means over every rank's samples (sums all-reduced, then divided once) and the images per second.
        Collective."""
        total = self.summed_over_ranks(device)
        samples = max(total.samples, 1)
        # all ranks' images in rank 0's time (each rank trains its share in the same time); after a mid-epoch
        # resume rank 0's sums carry the other ranks' share of the interrupted part: no world-size factor
        metrics = {"train/loss": total.loss_sum / samples, "train/epoch_seconds": total.seconds,
                   "train/images_per_second": total.samples / max(total.seconds, 1e-9)}
        metrics.update({f"train/{name}": value / samples for name, value in total.parts_sum.items()})
        return metrics

    @classmethod
    def resumed(cls, state: dict, carries_sums: bool) -> "EpochMeter":
        """A mid-epoch checkpoint's meter: its sums are over all ranks already, so one rank carries them on and
        the others start at zero, with the same part names: :meth:`summed_over_ranks` all-reduces one value
        per name, and a rank with fewer would hang the others (a resume at an epoch's last step trains none)."""
        if carries_sums:
            return cls(**state)
        return cls(parts_sum={name: 0.0 for name in state["parts_sum"]})

    def state(self) -> dict:
        """The checkpoint's copy: plain floats (this rank's sums; see summed_over_ranks)."""
        return {"samples": self.samples, "loss_sum": float(self.loss_sum),
                "parts_sum": {n: float(v) for n, v in self.parts_sum.items()}, "seconds": self.seconds}


class RankFlags:
    """The non-finite and stop flags, agreed across ranks every ``sync_every`` steps.

    A step records on the device only: its loss and parts, kept if they are the first non-finite ones of the
    window. :meth:`agree` all-reduces "non-finite here" with each rank's stop request and reads the result:
    one host-device synchronisation per window instead of several per step. Every rank calls it at the
    same steps, so every rank leaves the loop at the same step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = 0  # steps recorded since the last agreement
        self.part_names: list[str] = []
        self.first_bad: torch.Tensor | None = None  # [step, loss, *parts]; step NaN while every step was finite

    def record(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.part_names = list(parts)
        values = torch.stack([loss.detach().float().reshape(())] + [v.detach().float().reshape(()) for v in parts.values()])
        here = torch.cat([values.new_full((1,), float(step)), values])
        if self.first_bad is None:
            self.first_bad = torch.full_like(here, float("nan"))
        keep = torch.isnan(self.first_bad[0]) & ~torch.isfinite(values).all()
        self.first_bad = torch.where(keep, here, self.first_bad)
        self.pending += 1

    def agree(self, stop_requested: bool, checkpoint_due: bool = False) -> tuple[bool, bool, bool, int | None, str]:
        """(some rank had a non-finite loss, some rank asked to stop, some rank asked for a checkpoint (rank 0's
        clock: checkpoint.every_minutes), this rank's first non-finite step (0-based) or None, its values as
        "loss=..., part=..."). Collective."""
        first_bad = self.first_bad if self.first_bad is not None else torch.full((1,), float("nan"), device=self.device)
        flags = torch.tensor([0.0, float(stop_requested), float(checkpoint_due)], device=self.device)
        flags[0] = (~torch.isnan(first_bad[0])).float()
        dist_util.all_reduce_sum(flags)
        values = torch.cat([flags, first_bad]).tolist()  # the window's one synchronisation
        self.pending, self.first_bad = 0, None
        seen_here = values[3] == values[3]  # not NaN: this rank had one
        detail = ", ".join(f"{name}={value:.4g}" for name, value in zip(["loss"] + self.part_names, values[4:]))
        return values[0] > 0, values[1] > 0, values[2] > 0, int(values[3]) if seen_here else None, detail


class StandardTraining:
    """How a method trains: its optimiser(s) and one optimisation step.

    The default (every method but MAXL): one SGD optimiser; forward, the method's loss,
    backward, optional clipping, step; fp16 through a GradScaler. A method that trains
    differently (MAXL: two networks updated in alternation) subclasses this and is
    registered in ``pipeline.train.factory.METHOD_TRAININGS``; the loops below stay the same.
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 peak_lr: float, *, device: torch.device, amp: str, grad_clip_norm: float = 0.0,
                 channels_last: bool = False):
        self.model = model  # the plain model
        self.train_model = train_model  # possibly DDP / compiled
        self.optimizers: dict[str, torch.optim.Optimizer] = {"net": optimizer}
        self.peak_lrs: dict[str, float] = {"net": peak_lr}
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.device, self.amp = device, amp
        self.grad_clip_norm, self.channels_last = grad_clip_norm, channels_last

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        """Called on the plain model before DDP / torch.compile wrap it (default: nothing)."""

    def set_lr_factor(self, factor: float) -> None:
        """Every optimiser follows the schedule, each from its own peak lr."""
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.peak_lrs[name] * factor

    @property
    def lr(self) -> float:
        return self.optimizers["net"].param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step; returns the loss (no host sync here) and its named parts."""
        with autocast_context(self.device, self.amp):
            outputs = self.train_model(images)
            loss, parts = self.model.method.loss(outputs, labels)
        self.backward_and_step(loss, self.optimizers["net"], self.model.parameters())
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          params: Iterable[torch.Tensor]) -> None:
        """Gradients of ``loss`` from zero, their norm over ``params`` clipped (optim.grad_clip_norm > 0),
        one step of ``optimizer``. fp16: through the GradScaler, which unscales before clipping and
        skips the step when a gradient is inf/NaN; deciding that reads its inf flag on the host, a
        synchronisation every step on CUDA that no window removes (bf16, the GPU recipes' amp, has none)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip_norm > 0:
                self.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            optimizer.step()

    def begin_epoch(self, epoch: int) -> None:
        """Called at the start (or mid-epoch resume) of every training epoch (default: nothing)."""

    def initial_metrics(self, loader: Iterable, steps: int) -> dict[str, float]:
        """Method-specific reference metrics before any training (logged at step 0; collective:
        every rank calls it). Default: none, and the loader is not touched."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific training statistics of the epoch (reduced over ranks), then reset."""
        return {}

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def final_artifacts(self, run_dir) -> list:
        """Files (paths) to log at the end of the run."""
        return []


def train_one_epoch(
    method_training: StandardTraining,
    loader: Iterable,
    *,
    epoch: int,
    steps: int,
    start_step: int,
    meter: EpochMeter,
    lr_factor_at: Callable[[int], float],
    global_step: int,
    stop_requested: Callable[[], bool],
    on_step_end: Callable[[], None] | None = None,
    progress=None,
    sync_every: int = 1,
    checkpoint_due: Callable[[], bool] = lambda: False,
    save_checkpoint: Callable[[float], None] | None = None,
    on_step_begin: Callable[[], None] | None = None,
) -> int:
    """Train `steps` iterations of one epoch, skipping the first `start_step` (mid-epoch resume).

    Returns the global step reached. Raises NonFiniteLoss (every rank, together) on a NaN/Inf loss and
    Preempted (every rank, together) when a stop was requested. Both are agreed across ranks after every
    step whose number (from the epoch's start) is a multiple of `sync_every`, and after the epoch's last
    step, so the caller never checkpoints a non-finite step: a step is neither read nor synchronised on
    between those points (train.sync_every, pipeline/train/config.py). `checkpoint_due()` is called on every
    rank just before each agreement; when it was true on some rank (rank 0's clock), every rank calls `save_checkpoint(seconds of this
    epoch so far)` together and training goes on (checkpoint.every_minutes). `on_step_begin` is called before
    each step (the hang watchdog's phase, pipeline/train/watchdog.py).
    """
    method_training.train_model.train()
    method_training.begin_epoch(epoch)
    flags = RankFlags(method_training.device)
    iterator = iter(loader)
    started = time.perf_counter()
    step = start_step - 1
    try:
        for step, (images, labels) in enumerate(iterator):
            if step >= steps:
                break
            if step < start_step:
                continue  # replay the epoch's order up to where the interrupted run stopped
            if on_step_begin is not None:
                on_step_begin()
            method_training.set_lr_factor(lr_factor_at(global_step))
            if method_training.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss, parts = method_training.step(images, labels)
            flags.record(step, loss, parts)
            meter.update(labels.shape[0], loss, parts)
            global_step += 1
            if on_step_end is not None:
                on_step_end()
            if progress is not None:
                progress.update(step, loss, method_training.lr)
            if (step + 1) % sync_every == 0 or step + 1 == steps:
                _agree_or_raise(flags, stop_requested(), checkpoint_due(), save_checkpoint, epoch, step, global_step,
                                meter, started)
    finally:
        close_iterator(iterator)
    if flags.pending:  # the loader ended before `steps`: the last steps are checked all the same
        _agree_or_raise(flags, stop_requested(), checkpoint_due(), save_checkpoint, epoch, step, global_step,
                        meter, started)
    meter.seconds += time.perf_counter() - started
    return global_step


def _agree_or_raise(flags: RankFlags, stop_requested: bool, checkpoint_due: bool,
                    save_checkpoint: Callable[[float], None] | None, epoch: int, step: int, global_step: int,
                    meter: EpochMeter, started: float) -> None:
    """Agree on the window's flags; a non-finite loss wins over a stop (no checkpoint of that state), a stop over
    a timed checkpoint (the stop writes one)."""
    non_finite, stop, checkpoint, first_bad_step, detail = flags.agree(stop_requested, checkpoint_due)
    if non_finite:
        agreed = f"agreed after step {step + 1}, global step {global_step}"
        if first_bad_step is None:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} by step {step + 1} on another rank ({agreed})")
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {first_bad_step + 1} on this rank ({agreed}): "
                            f"{detail}")
    if stop:
        meter.seconds += time.perf_counter() - started
        raise Preempted(f"stop requested at epoch {epoch + 1} step {step + 1}")  # 1-based, as progress
    if checkpoint and save_checkpoint is not None:
        save_checkpoint(time.perf_counter() - started)


def close_iterator(iterator) -> None:
    """An FFCV iterator abandoned before its end must be closed (its threads); others need nothing."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _merge_flip(outputs: dict, flipped: dict) -> dict:
    return {k: (outputs[k].float() + flipped[k].float()) / 2 for k in outputs}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp: str,
    num_classes: int,
    topk: Iterable[int] = (1, 5),
    tta_flip: bool = False,
    channels_last: bool = False,
    prefix: str = "val",
    soft_out: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Top-k of every prediction rule of the method, its extra metrics, the val loss, and the
    main head's confusion matrix (rows = true class), all summed over ranks (exact counts:
    the val loader gives every rank a disjoint share, no padding).  With ``soft_out`` (a C x C
    float CPU tensor) also the *soft* confusion: the main rule's softmax averaged per true class
    over the same images (a row of zeros for a class without images)."""
    model = unwrap(model)
    method = model.method
    model.eval()
    topk = sorted(set(min(k, num_classes) for k in topk))
    counts: dict[str, torch.Tensor] = {}
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    soft_sums = None if soft_out is None else torch.zeros(num_classes, num_classes, device=device)

    def add(name: str, value: torch.Tensor) -> None:
        counts[name] = counts.get(name, torch.zeros((), dtype=torch.float64, device=device)) + value.double()

    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            outputs = model(images)
            if tta_flip:
                outputs = _merge_flip(outputs, model(torch.flip(images, dims=[3])))
            loss, parts = method.loss(outputs, labels)
        n = labels.shape[0]
        add("samples", torch.tensor(float(n), device=device))
        add("loss", loss.detach().float() * n)
        for part, value in parts.items():
            add(f"loss/{part}", value.detach().float() * n)
        for rule, log_probs in method.predict(outputs).items():
            top = log_probs.topk(topk[-1], dim=1).indices
            hits = top == labels[:, None]
            for k in topk:
                add(f"top{k}/{rule}", hits[:, :k].any(dim=1).sum())
            if rule == "main":
                confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2)
                if soft_sums is not None:  # a matmul, not index_add_ (atomics on CUDA: not deterministic)
                    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
                    soft_sums.addmm_(one_hot.T, log_probs.float().exp())
        for name, correct in method.extra_metrics(outputs, labels).items():
            add(name, correct.sum())

    names = sorted(counts)
    packed = torch.stack([counts[n] for n in names]) if names else torch.zeros(0, device=device)
    dist_util.all_reduce_sum(packed)
    dist_util.all_reduce_sum(confusion)
    confusion = confusion.view(num_classes, num_classes)
    if soft_sums is not None:
        dist_util.all_reduce_sum(soft_sums)
        soft_out.copy_(soft_sums / confusion.sum(dim=1, keepdim=True).clamp(min=1))
    totals = dict(zip(names, packed.tolist()))
    samples = max(totals.pop("samples", 0.0), 1.0)
    metrics = {f"{prefix}/{name}": value / samples for name, value in totals.items()}
    metrics[f"{prefix}/samples"] = samples
    return metrics, confusion.cpu()


class Progress:
    """A tqdm bar on a TTY (its loss and img/s postfix refreshed every `log_every` steps), plain log lines
    every `log_every` steps otherwise (SLURM logs)."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, steps: int, start_step: int, batch: int,
                 log_every: int):
        self.enabled, self.epoch, self.epochs, self.steps = enabled, epoch, epochs, steps
        self.batch, self.log_every = batch, log_every
        self.started = time.perf_counter()
        self.done = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                            dynamic_ncols=True, leave=False)

    def update(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """`loss` is read (a host-device synchronisation) only on the steps that print it."""
        if not self.enabled:
            return
        self.done += 1
        printing = (step + 1) % self.log_every == 0 or step + 1 == self.steps
        if self.bar is not None:
            self.bar.update(1)
        if not printing:
            return
        rate = self.done * self.batch / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
        else:
            eta = (self.steps - step - 1) * self.batch / max(rate, 1e-9)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps} loss {float(loss):.4f} "
                  f"lr {lr:.4g} {rate:.0f} img/s eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
