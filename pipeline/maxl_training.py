"""MAXL training (METHODS.md section 3): a multi-task net and a label generator updated in
alternation, each with its own SGD optimiser following the run's per-iteration schedule.

Registered in ``pipeline/train.py``'s ``TRAININGS`` for ``method.name: maxl``; the model side is
``ssal_models/maxl.py``.

One iteration (``MaxlTraining.step``):

1. multi-task step: forward through the (possibly DDP-wrapped) model -- the generator's logits
   come along under ``no_grad`` --, ``L_pri + L_aux`` (focal losses, the auxiliary one against
   the generated soft labels), backward, optional clipping, SGD step of the multi-task net only
   (fp16: through the GradScaler);
2. every ``generator_every``-th iteration (method option, default 1; 0 = never), a generator
   meta step on the same batch *after* the multi-task update: ``generator_step`` writes the
   meta-gradient of ``L_pri(theta+) + lambda * H`` into the generator's ``.grad`` (the virtual
   step uses the multi-task optimiser's current lr, weight decay and momentum buffers), the
   gradients are averaged over ranks here (the generator is not in DDP), and the generator's
   optimiser steps unless the gradient is non-finite on any rank (then the step is skipped and
   counted). The two networks are never updated from one joint loss (supplementary section 5).

Options (``method.options``, validated by ``ssal_models.maxl.build_maxl_method`` and kept in
``model.method.training_options``): ``generator_lr`` (absolute peak lr, default 1e-3, *not*
scaled with the batch), ``generator_weight_decay`` (5e-4), ``generator_momentum`` (0),
``generator_every`` (1). The multi-task optimiser keeps the run's ``optim.*`` settings (the
engine's SGD with the generator's parameters removed).

DDP: :meth:`MaxlTraining.prepare_model` lists the generator in the parameters DDP ignores (the
trainer calls it before wrapping). The generator starts from rank 0's weights; its gradients
are averaged here; its BatchNorm running statistics (which both the multi-task forward and the
meta step update, each rank on its own batch) are broadcast from rank 0 after every iteration,
as DDP does for the multi-task net's buffers, so every rank, and every checkpoint, holds the
same generator. Mid-epoch resume is exact: the iteration counter and the epoch's statistics are
in :meth:`state_dict`.

Per-epoch metrics (:meth:`epoch_metrics`; the sums are all-reduced at every step, so a mid-epoch
checkpoint, written by rank 0, holds every rank's share): ``train/label_fraction`` (the
supplementary's "Label %": fraction of auxiliary classes that are the argmax of the generated
distribution of at least one training sample of the epoch), ``train/entropy_term`` (batch
``H = sum pbar log pbar``, mean over the epoch's batches, weighted by batch size),
``train/aux_acc`` (auxiliary head's argmax vs the generated label's argmax on the training
batches, before the update), ``train/meta_loss`` (``L_pri(theta+)``), ``train/generator_steps``,
``train/generator_skipped``, ``train/generator_lr``. Evaluation adds ``val/aux_acc`` and
``val/aux_in_set`` (``method.extra_metrics``) and ``val/top1/aux_sum``.

AMP: bf16/fp16 autocast, the fp16 GradScaler and the meta step's ``grad_scale`` run under CPU
autocast in tests/test_autocast_steps.py, and under CUDA in tests/test_gpu.py (bench/gpu_check.sh).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.engine import StandardTraining, autocast_context
from pipeline.util import dist as dist_util
from ssal_models import maxl as mx

LABELS_JSON = "maxl_label_distribution.json"
LABELS_PNG = "maxl_label_distribution.png"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Broadcast a list of tensors from ``src`` in place, one flat message per dtype."""
    if not _distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        for t in group:
            n = t.numel()
            t.data.copy_(flat[offset:offset + n].view_as(t))
            offset += n


class MaxlTraining(StandardTraining):
    """Two optimisers (``net``: the multi-task net, ``generator``: the label generator) and the
    alternating step; see the module docstring."""

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        mx.ddp_ignore_generator(model)

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 peak_lr: float, *, device: torch.device, amp: str, grad_clip_norm: float = 0.0,
                 channels_last: bool = False):
        super().__init__(model, train_model, optimizer, peak_lr, device=device, amp=amp,
                         grad_clip_norm=grad_clip_norm, channels_last=channels_last)
        method = model.method
        opts = dict(mx.TRAINING_OPTIONS)
        opts.update(getattr(method, "training_options", None) or {})
        self.options = opts
        self.generator = method.generator
        self.generator_params = mx.generator_parameters(model)
        self.net_params = mx.multitask_parameters(model)
        gen_ids = {id(p) for p in self.generator_params}
        # the engine's optimiser, without the generator's parameters (same groups and settings)
        groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) not in gen_ids]
            if params:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        net_optimizer = type(optimizer)(groups, **optimizer.defaults)
        gen_optimizer = torch.optim.SGD(self.generator_params, lr=opts["generator_lr"],
                                        momentum=opts["generator_momentum"],
                                        weight_decay=opts["generator_weight_decay"])
        self.optimizers = {"net": net_optimizer, "generator": gen_optimizer}
        self.peak_lrs = {"net": peak_lr, "generator": opts["generator_lr"]}
        self.every = int(opts["generator_every"])
        self.iteration = 0  # multi-task steps done (all epochs); drives the alternation
        self.num_aux = int(method.num_aux)
        self.psi = list(method.psi)
        self.last_counts: list[int] | None = None  # the last finished epoch's label histogram
        self.last_epoch_metrics: dict[str, float] = {}
        self._reset_epoch()
        # the generator is outside DDP: start every rank from rank 0's weights
        _broadcast_(list(self.generator.parameters()) + list(self.generator.buffers()))

    # -- per-epoch sums (kept in the checkpoint for an exact mid-epoch resume)

    def _reset_epoch(self) -> None:
        self.counts = torch.zeros(self.num_aux, dtype=torch.float64, device=self.device)
        # samples, entropy*batch, aux hits (all over ranks), meta loss sum (rank mean),
        # generator steps, skipped generator steps
        self.sums = torch.zeros(6, dtype=torch.float64, device=self.device)

    # -- one iteration

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        method = self.model.method
        optimizer = self.optimizers["net"]
        with autocast_context(self.device, self.amp):
            outputs = self.train_model(images)
            loss, parts = method.loss(outputs, labels)
        with torch.no_grad():
            # summed over ranks at every step (one small all-reduce), so that every rank, and a
            # mid-epoch checkpoint written by rank 0, holds the whole epoch's statistics so far
            stats = method.statistics(outputs, labels)
            hits = method.extra_metrics(outputs, labels)["aux_acc"].sum()
            n = labels.shape[0]
            packed = torch.cat([stats["label_counts"].double(),
                                torch.stack([torch.tensor(float(n), dtype=torch.float64, device=self.device),
                                             stats["entropy_term"].double() * n, hits.double()])])
            dist_util.all_reduce_sum(packed)
            self.counts += packed[:self.num_aux]
            self.sums[:3] += packed[self.num_aux:]
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip_norm > 0:
                self.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(self.net_params, self.grad_clip_norm)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(self.net_params, self.grad_clip_norm)
            optimizer.step()
        self.iteration += 1
        if self.every > 0 and self.iteration % self.every == 0:
            self.generator_step(images, labels)
        # BN running statistics of the generator: rank 0's everywhere (as DDP does for the net)
        _broadcast_([b for b in self.generator.buffers() if b.is_floating_point()])
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def generator_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One meta step of the generator on this rank's batch; gradients averaged over ranks."""
        gen_optimizer = self.optimizers["generator"]
        gen_optimizer.zero_grad(set_to_none=True)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        with autocast_context(self.device, self.amp):
            stats = self.model.method.generator_step(self.model, images, labels,
                                                     net_optimizer=self.optimizers["net"], grad_scale=scale,
                                                     accumulate=False)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.generator_params]
        bad = 0.0 if bool(stats["finite"]) else 1.0
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [stats["meta_loss"].reshape(1).float(), torch.tensor([bad], device=self.device)])
        dist_util.all_reduce_sum(flat)
        world = dist.get_world_size() if _distributed() else 1
        if flat[-1].item() > 0:  # non-finite on some rank: every rank skips this step
            self.sums[5] += 1
        else:
            offset = 0
            for p, g in zip(self.generator_params, grads):
                k = g.numel()
                p.grad = (flat[offset:offset + k].view_as(p) / world).to(p.dtype)
                offset += k
            gen_optimizer.step()
            self.sums[3] += flat[-2].double() / world  # mean over ranks
            self.sums[4] += 1
        gen_optimizer.zero_grad(set_to_none=True)  # no stale generator grads in the next net step

    # -- metrics, checkpoints, artifacts

    def epoch_metrics(self) -> dict[str, float]:
        counts, sums = self.counts, self.sums  # already summed over ranks (see step)
        samples = max(sums[0].item(), 1.0)
        steps = sums[4].item()
        metrics = {
            "train/label_fraction": mx.used_label_fraction(counts),
            "train/entropy_term": sums[1].item() / samples,
            "train/aux_acc": sums[2].item() / samples,
            "train/generator_steps": steps,
            "train/generator_skipped": sums[5].item(),
            "train/generator_lr": self.optimizers["generator"].param_groups[0]["lr"],
        }
        if steps > 0:
            metrics["train/meta_loss"] = sums[3].item() / steps
        self.last_counts = [int(c) for c in counts.round().long().tolist()]
        self.last_epoch_metrics = dict(metrics)
        self._reset_epoch()
        return metrics

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["maxl"] = {"iteration": self.iteration, "counts": self.counts.cpu(), "sums": self.sums.cpu(),
                         "last_counts": self.last_counts, "last_epoch_metrics": self.last_epoch_metrics}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        extra = state["maxl"]
        self.iteration = int(extra["iteration"])
        self.counts = extra["counts"].to(self.device, torch.float64)
        self.sums = extra["sums"].to(self.device, torch.float64)
        self.last_counts = extra.get("last_counts")
        self.last_epoch_metrics = dict(extra.get("last_epoch_metrics") or {})

    def label_distribution(self) -> dict:
        """The generator's label distribution of the last finished epoch (training samples)."""
        counts = self.last_counts or [0] * self.num_aux
        per_class, offset = [], 0
        for k in self.psi:
            per_class.append(counts[offset:offset + k])
            offset += k
        return {
            "psi": self.psi,
            "num_aux": self.num_aux,
            "counts": counts,
            "per_class": per_class,
            "label_fraction": mx.used_label_fraction(torch.tensor(counts)),
            "entropy_weight": float(self.model.method.entropy_weight),
            "meta_order": self.model.method.meta_order,
            "epoch_metrics": self.last_epoch_metrics,
        }

    def final_artifacts(self, run_dir) -> list:
        run_dir = Path(run_dir)
        info = self.label_distribution()
        json_path = run_dir / LABELS_JSON
        json_path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in info.items())
                             + "\n}\n")
        paths = [json_path]
        try:
            png = run_dir / LABELS_PNG
            label_distribution_figure(info, png)
            paths.append(png)
        except Exception as err:  # a plot must never fail the run
            print(f"warning: MAXL label distribution plot failed: {err}", flush=True)
        return paths


def label_distribution_figure(info: dict, path: Path) -> None:
    """Heat-map: rows = primary classes, columns = their auxiliary classes (slot 0..psi-1),
    value = fraction of the class's training samples whose generated label is that slot."""
    import numpy as np
    from pipeline import plots  # noqa: F401  (forces the Agg backend)
    import matplotlib.pyplot as plt

    per_class = info["per_class"]
    width = max(info["psi"]) if info["psi"] else 1
    grid = np.full((len(per_class), width), np.nan)
    for row, counts in enumerate(per_class):
        total = sum(counts)
        for col, c in enumerate(counts):
            grid[row, col] = c / total if total else 0.0
    height = min(12.0, 2.0 + 0.15 * len(per_class))
    fig, ax = plt.subplots(figsize=(3.5 + 0.6 * width, height))
    im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xlabel("auxiliary class of the primary class")
    ax.set_ylabel("primary class")
    ax.set_title(f"MAXL labels: {100 * info['label_fraction']:.0f}% of {info['num_aux']} used\n"
                 f"(entropy weight {info['entropy_weight']:g})", fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of the class's samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
