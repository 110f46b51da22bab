"""MAXL training (METHODS.md section 3): a multi-task net and a label generator updated in
alternation, each with its own SGD optimiser following the run's per-iteration schedule.

Registered in ``pipeline.train.factory.METHOD_TRAININGS`` for ``method.name: maxl``; the model side is
``ssal_models/maxl.py``.

One iteration (``MaxlTraining.step``), ``schedule: interleave`` (default):

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

``schedule: alternate_epochs`` (the authors' ``model_vgg_maxl.py``: a pass of multi-task steps,
then a pass of generator steps over freshly drawn batches): even epochs (0, 2, ...) do step 1
only, odd epochs only a generator meta step per batch (the multi-task net, its BN statistics
and its optimiser state untouched; ``train/loss`` is then ``L_pri + L_aux`` at the current
``theta``); ``generator_every`` is not used. The epoch comes from the engine's
``begin_epoch`` hook, so a mid-epoch resume continues with the right network.

``H`` is ``method.options.entropy_estimate`` (``batch`` | ``global`` | ``ema``, see
``ssal_models/maxl.py``); in a multi-process run the meta step gets ``gather`` (an all-gather
of every rank's label sums) so ``global`` and ``ema`` see the global batch.

Options (``method.options``, validated by ``ssal_models.maxl.build_maxl_method`` and kept in
``model.method.training_options``): ``generator_lr`` (absolute peak lr, default 1e-3, *not*
scaled with the batch), ``generator_weight_decay`` (5e-4), ``generator_momentum`` (0),
``generator_every`` (1), ``schedule`` (``interleave``). The multi-task optimiser keeps the run's
``optim.*`` settings (the engine's SGD with the generator's parameters removed).

DDP: :meth:`MaxlTraining.prepare_model` lists the generator (and the collapse estimate's running
sums) in what DDP ignores (the trainer calls it before wrapping). The generator starts from rank
0's weights; its gradients are averaged here; its BatchNorm running statistics (which both the
multi-task forward and the meta step update, each rank on its own batch) are broadcast from
rank 0 after every iteration, as DDP does for the multi-task net's buffers, so every rank, and
every checkpoint, holds the same generator. Mid-epoch resume is exact: the iteration counter
and the epoch's statistics are in :meth:`state_dict`.

Label metrics (``ssal_models.maxl_labels.label_metrics``) of the generated labels of the epoch's
training samples (``interleave`` / multi-task epochs: as the multi-task step used them;
generator epochs: before each meta step), and once before training at step 0 for the
untrained generator on epoch 0's batches (:meth:`initial_metrics`, the reference):
``train/label_entropy`` (mean per-sample entropy, nats), ``train/label_entropy_frac`` (the same
/ log psi of the sample's class, classes with psi > 1), ``train/label_max_prob``,
``train/label_fraction`` (the supplementary's "Label %": share of auxiliary classes that are the
argmax of at least one sample), ``train/label_marginal_entropy`` (per primary class, the
entropy of its samples' mean label; mean over classes) and ``..._frac`` (/ log psi). The
argmax histogram and the per-class marginal entropies of every logged epoch go into the
artifact ``maxl_label_distribution.json`` (``epochs``), with a heat-map of the untrained and the
last epoch. Also per epoch (:meth:`epoch_metrics`; every sum is all-reduced at each step, so a
mid-epoch checkpoint, written by rank 0, holds every rank's share): ``train/entropy_term``
(batch-form ``H`` of the measured labels, mean over batches weighted by size),
``train/entropy_estimate`` (the configured ``H``, mean over generator steps), ``train/aux_acc``
(auxiliary head's argmax vs the generated label's argmax before the update; epochs with
multi-task steps), ``train/meta_loss`` (``L_pri(theta+)``), ``train/generator_steps``,
``train/generator_skipped``, ``train/generator_lr``. Evaluation adds ``val/aux_acc`` and
``val/aux_in_set`` (``method.extra_metrics``) and ``val/top1/aux_sum``.

AMP: bf16/fp16 autocast, the fp16 GradScaler and the meta step's ``grad_scale`` run under CPU
autocast in tests/test_autocast_steps.py, and under CUDA in tests/test_gpu.py (bench/gpu_check.sh).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.engine import StandardTraining, autocast_context, close_iterator
from pipeline.train import dist as dist_util
from ssal_models import maxl, maxl_labels

LABELS_JSON = "maxl_label_distribution.json"
LABELS_PNG = "maxl_label_distribution.png"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_SCALAR_SUMS = [k for k in maxl_labels.LABEL_SUM_KEYS if k not in ("counts", "soft_counts")]


# indices into MaxlTraining.sums, the epoch's sums beside the label statistics: batch-form H x samples, aux
# hits, samples with an aux prediction (added at every step, summed over ranks); meta loss, generator steps,
# skipped generator steps, the configured H (added by the generator steps; meta loss and H as means over ranks)
(_ENTROPY_TERM, _AUX_HITS, _AUX_SAMPLES, _META_LOSS, _GENERATOR_STEPS, _GENERATOR_SKIPPED,
 _ENTROPY_ESTIMATE) = range(7)


def _label_sums_size(num_aux: int) -> int:
    return 2 * num_aux + len(_SCALAR_SUMS)


def _pack_label_sums(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """``maxl_labels.label_sums`` as one float64 vector (one all-reduce, one checkpoint entry)."""
    return torch.cat([sums["counts"], sums["soft_counts"], torch.stack([sums[k] for k in _SCALAR_SUMS])]).double()


def _unpack_label_sums(packed: torch.Tensor, num_aux: int) -> dict[str, torch.Tensor]:
    out = {"counts": packed[:num_aux], "soft_counts": packed[num_aux:2 * num_aux]}
    out.update({k: packed[2 * num_aux + i] for i, k in enumerate(_SCALAR_SUMS)})
    return out


def _all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """``(world, *shape)``: every rank's ``tensor`` in rank order (the collapse estimate's gather)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


class MaxlTraining(StandardTraining):
    """Two optimisers (``net``: the multi-task net, ``generator``: the label generator) and the
    alternating step; see the module docstring."""

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        maxl.ddp_ignore_generator(model)

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 peak_lr: float, *, device: torch.device, amp: str, grad_clip_norm: float = 0.0,
                 channels_last: bool = False):
        super().__init__(model, train_model, optimizer, peak_lr, device=device, amp=amp,
                         grad_clip_norm=grad_clip_norm, channels_last=channels_last)
        method = model.method
        options = dict(maxl.TRAINING_OPTIONS)
        options.update(getattr(method, "training_options", None) or {})
        self.options = options
        self.generator = method.generator
        self.generator_params = maxl.generator_parameters(model)
        self.net_params = maxl.multitask_parameters(model)
        gen_ids = {id(p) for p in self.generator_params}
        # the engine's optimiser, without the generator's parameters (same groups and settings)
        groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) not in gen_ids]
            if params:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        net_optimizer = type(optimizer)(groups, **optimizer.defaults)
        gen_optimizer = torch.optim.SGD(self.generator_params, lr=options["generator_lr"],
                                        momentum=options["generator_momentum"],
                                        weight_decay=options["generator_weight_decay"])
        self.optimizers = {"net": net_optimizer, "generator": gen_optimizer}
        self.peak_lrs = {"net": peak_lr, "generator": options["generator_lr"]}
        self.generator_every = int(options["generator_every"])
        self.alternate_epochs = options["schedule"] == "alternate_epochs"
        self.epoch = 0  # set by begin_epoch: decides which network alternate_epochs trains
        self.iteration = 0  # multi-task steps done (all epochs); drives the interleaving
        self.num_aux = int(method.num_aux)
        self.psi = list(method.psi)
        self.gather = _all_gather_stack if _distributed() else None
        self.label_history: list[dict] = []  # per logged epoch (0 = the untrained generator)
        self.last_epoch_metrics: dict[str, float] = {}
        self._reset_epoch()
        # the generator is outside DDP: start every rank from rank 0's weights
        dist_util.broadcast_(list(self.generator.parameters()) + list(self.generator.buffers()))

    # -- per-epoch sums (kept in the checkpoint for an exact mid-epoch resume)

    def _reset_epoch(self) -> None:
        self.label_sums = torch.zeros(_label_sums_size(self.num_aux), dtype=torch.float64, device=self.device)
        self.sums = torch.zeros(7, dtype=torch.float64, device=self.device)

    def _add_label_statistics(self, gen_log_probs: torch.Tensor, labels: torch.Tensor,
                              hits: torch.Tensor | None) -> None:
        """Add a batch's label statistics, summed over ranks now (one small all-reduce), so that
        every rank, and a mid-epoch checkpoint written by rank 0, holds the epoch so far."""
        n = labels.shape[0]
        one = torch.ones((), dtype=torch.float64, device=self.device)
        extra = torch.stack([maxl.entropy_term(gen_log_probs).double() * n,
                             hits.sum().double() if hits is not None else 0 * one,
                             one * n if hits is not None else 0 * one])
        packed = torch.cat([_pack_label_sums(maxl_labels.label_sums(gen_log_probs, labels, self.psi)), extra])
        dist_util.all_reduce_sum(packed)
        self.label_sums += packed[:-3]
        self.sums[_ENTROPY_TERM:_AUX_SAMPLES + 1] += packed[-3:]

    # -- one iteration

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def generator_epoch(self) -> bool:
        """alternate_epochs: odd epochs train the generator only."""
        return self.alternate_epochs and self.epoch % 2 == 1

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.generator_epoch:
            stats = self.generator_step(images, labels)
            with torch.no_grad():
                self._add_label_statistics(stats["gen_log_probs"], labels, None)
            parts = {k: stats[k] for k in ("focal/main", "focal/aux")}
            dist_util.broadcast_([b for b in self.generator.buffers() if b.is_floating_point()])
            return parts["focal/main"] + parts["focal/aux"], parts
        method = self.model.method
        with autocast_context(self.device, self.amp):
            outputs = self.train_model(images)
            loss, parts = method.loss(outputs, labels)
        with torch.no_grad():
            self._add_label_statistics(method.generated_log_probs(outputs, labels), labels,
                                       method.extra_metrics(outputs, labels)["aux_acc"])
        self.backward_and_step(loss, self.optimizers["net"], self.net_params)
        self.iteration += 1
        if not self.alternate_epochs and self.generator_every > 0 and self.iteration % self.generator_every == 0:
            self.generator_step(images, labels)
        # BN running statistics of the generator: rank 0's everywhere (as DDP does for the net)
        dist_util.broadcast_([b for b in self.generator.buffers() if b.is_floating_point()])
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def generator_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One meta step of the generator on this rank's batch; gradients averaged over ranks."""
        gen_optimizer = self.optimizers["generator"]
        gen_optimizer.zero_grad(set_to_none=True)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        with autocast_context(self.device, self.amp):
            stats = self.model.method.generator_step(self.model, images, labels,
                                                     net_optimizer=self.optimizers["net"], grad_scale=scale,
                                                     accumulate=False, gather=self.gather)
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self.generator_params]
        flat = torch.cat([grad.reshape(-1).float() for grad in grads]
                         + [stats["meta_loss"].reshape(1).float(), stats["entropy_term"].reshape(1).float(),
                            (~stats["finite"]).float().reshape(1)])
        dist_util.all_reduce_sum(flat)
        world = dist.get_world_size() if _distributed() else 1
        # the one host read of the meta step here (whether every rank steps the generator's optimiser);
        # ssal_models' generator_step reads its own finite flag, and the first-order step its norm
        # (tests/test_sync_free_step.py counts them)
        if flat[-1].item() > 0:  # non-finite on some rank: every rank skips this step
            self.sums[_GENERATOR_SKIPPED] += 1
        else:
            offset = 0
            for param, grad in zip(self.generator_params, grads):
                size = grad.numel()
                param.grad = (flat[offset:offset + size].view_as(param) / world).to(param.dtype)
                offset += size
            gen_optimizer.step()
            self.sums[_META_LOSS] += flat[-3].double() / world  # mean over ranks
            self.sums[_GENERATOR_STEPS] += 1
            self.sums[_ENTROPY_ESTIMATE] += flat[-2].double() / world
        gen_optimizer.zero_grad(set_to_none=True)  # no stale generator grads in the next net step
        return stats

    # -- metrics, checkpoints, artifacts

    def _label_metrics(self, label_sums: torch.Tensor, epoch: int) -> dict[str, float]:
        """``train/label_*`` from an epoch's summed label statistics; the histogram and the per-class
        marginal entropies go to :attr:`label_history` (the artifact)."""
        found = maxl_labels.label_metrics(_unpack_label_sums(label_sums.cpu(), self.num_aux), self.psi)
        self.label_history.append({"epoch": epoch, "counts": found.pop("counts"),
                                   "marginal_entropy": found.pop("marginal_entropy")})
        return {f"train/{k}": float(v) for k, v in found.items()}

    def initial_metrics(self, loader, steps: int) -> dict[str, float]:
        """The untrained generator's ``train/label_*`` over the first epoch's ``steps`` batches (the
        reference logged at step 0). Leaves every parameter and buffer as it was."""
        generator, method = self.generator, self.model.method
        saved = {k: v.clone() for k, v in generator.state_dict().items()}
        was_training = generator.training
        generator.train()  # as in the training forward: BN batch statistics
        sums = torch.zeros(_label_sums_size(self.num_aux), dtype=torch.float64, device=self.device)
        iterator = iter(loader)
        try:
            with torch.no_grad():
                for step, (images, labels) in enumerate(iterator):
                    if step >= steps:
                        break
                    if self.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    with autocast_context(self.device, self.amp):
                        logits = generator(images)
                    gen_log_probs = maxl.mask_log_softmax(logits, labels, method.mask)
                    sums += _pack_label_sums(maxl_labels.label_sums(gen_log_probs, labels, self.psi))
        finally:
            close_iterator(iterator)
            generator.load_state_dict(saved)
            generator.train(was_training)
        dist_util.all_reduce_sum(sums)
        return self._label_metrics(sums, 0)

    def epoch_metrics(self) -> dict[str, float]:
        sums = self.sums  # already summed over ranks (see _add_label_statistics)
        samples = max(_unpack_label_sums(self.label_sums, self.num_aux)["samples"].item(), 1.0)
        steps = sums[_GENERATOR_STEPS].item()
        metrics = {
            "train/entropy_term": sums[_ENTROPY_TERM].item() / samples,
            "train/generator_steps": steps,
            "train/generator_skipped": sums[_GENERATOR_SKIPPED].item(),
            "train/generator_lr": self.optimizers["generator"].param_groups[0]["lr"],
        }
        if sums[_AUX_SAMPLES].item() > 0:
            metrics["train/aux_acc"] = sums[_AUX_HITS].item() / sums[_AUX_SAMPLES].item()
        if steps > 0:
            metrics["train/meta_loss"] = sums[_META_LOSS].item() / steps
            metrics["train/entropy_estimate"] = sums[_ENTROPY_ESTIMATE].item() / steps
        metrics.update(self._label_metrics(self.label_sums, self.epoch + 1))
        self.last_epoch_metrics = dict(metrics)
        self._reset_epoch()
        return metrics

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["maxl"] = {"iteration": self.iteration, "label_sums": self.label_sums.cpu(), "sums": self.sums.cpu(),
                         "label_history": self.label_history, "last_epoch_metrics": self.last_epoch_metrics}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        extra = state["maxl"]
        self.iteration = int(extra["iteration"])
        self.label_sums = extra["label_sums"].to(self.device, torch.float64)
        self.sums = extra["sums"].to(self.device, torch.float64)
        self.label_history = list(extra.get("label_history") or [])
        self.last_epoch_metrics = dict(extra.get("last_epoch_metrics") or {})

    def label_distribution(self) -> dict:
        """The generator's label histograms: the last logged epoch's, per class, and every logged
        epoch's (epoch 0: the untrained generator) with the per-class marginal entropies."""
        last = self.label_history[-1] if self.label_history else {"counts": [0] * self.num_aux}
        counts = last["counts"]
        per_class, offset = [], 0
        for k in self.psi:
            per_class.append(counts[offset:offset + k])
            offset += k
        method = self.model.method
        return {
            "psi": self.psi,
            "num_aux": self.num_aux,
            "counts": counts,
            "per_class": per_class,
            "label_fraction": maxl.used_label_fraction(torch.tensor(counts)),
            "entropy_weight": float(method.entropy_weight),
            "entropy_estimate": method.collapse.estimate,
            "meta_order": method.meta_order,
            "schedule": self.options["schedule"],
            "epoch_metrics": self.last_epoch_metrics,
            "epochs": self.label_history,
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


def _per_class_grid(counts: list[int], psi: list[int]):
    grid = np.full((len(psi), max(psi) if psi else 1), np.nan)
    offset = 0
    for row, k in enumerate(psi):
        block = counts[offset:offset + k]
        total = sum(block)
        grid[row, :k] = [c / total if total else 0.0 for c in block]
        offset += k
    return grid


def label_distribution_figure(info: dict, path: Path) -> None:
    """Heat-maps: rows = primary classes, columns = their auxiliary classes (slot 0..psi-1),
    value = fraction of the class's training samples whose generated label is that slot; the
    untrained generator (epoch 0) beside the last logged epoch."""
    from pipeline.tracking import plots  # noqa: F401  (forces the Agg backend)
    import matplotlib.pyplot as plt

    history = info.get("epochs") or [{"epoch": None, "counts": info["counts"]}]
    panels = [history[0], history[-1]] if len(history) > 1 else history[-1:]
    width = max(info["psi"]) if info["psi"] else 1
    height = min(12.0, 2.0 + 0.15 * len(info["psi"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + (2.5 + 0.6 * width) * len(panels), height), squeeze=False)
    for ax, entry in zip(axes[0], panels):
        im = ax.imshow(_per_class_grid(entry["counts"], info["psi"]), aspect="auto", vmin=0.0, vmax=1.0,
                       cmap="viridis", interpolation="nearest")
        used = sum(1 for c in entry["counts"] if c > 0) / max(info["num_aux"], 1)
        name = "untrained" if entry["epoch"] == 0 else f"epoch {entry['epoch']}" if entry["epoch"] else "last epoch"
        ax.set_title(f"{name}: {100 * used:.0f}% of {info['num_aux']} used", fontsize=10)
        ax.set_xlabel("auxiliary class of the primary class")
    axes[0][0].set_ylabel("primary class")
    fig.suptitle(f"MAXL labels (entropy weight {info['entropy_weight']:g}, "
                 f"{info.get('entropy_estimate', 'batch')} estimate)", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), label="fraction of the class's samples")
    fig.savefig(path, dpi=100)
    plt.close(fig)
