"""MAXL's generated labels: the collapse regulariser's three estimates and the label statistics.

Pure PyTorch (no I/O, no distributed calls: a multi-process caller passes ``gather``). The
exact forms and gradient paths are stated in ``ssal_models/maxl.py``'s docstring ("Collapse
regulariser"); :class:`CollapseRegulariser` implements them, :func:`label_sums` /
:func:`label_metrics` measure what the generator produces (summable per batch, so a caller
can add them over an epoch and over ranks before turning them into metrics).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .maxl_losses import at_least_float32, aux_owner, xlogx

__all__ = ["ENTROPY_ESTIMATES", "Gather", "CollapseRegulariser", "label_sums", "label_metrics", "LABEL_SUM_KEYS"]

ENTROPY_ESTIMATES = ("batch", "global", "ema")

#: ``gather(t)`` -> ``(world, *t.shape)``: every rank's ``t`` stacked in rank order (no gradient
#: needed; one process: ``t[None]``). The pipeline builds it from ``torch.distributed.all_gather``.
Gather = Callable[[torch.Tensor], torch.Tensor]


class CollapseRegulariser(nn.Module):
    """``H`` of ``ssal_models/maxl.py``'s docstring for ``estimate`` in :data:`ENTROPY_ESTIMATES`.

    ``forward(gen_log_probs, gather=None, update=True)`` returns a scalar whose *value* is the
    estimate's ``H`` and whose *gradient* (w.r.t. this process's ``gen_log_probs``) is the one
    documented there; ``update`` advances the running estimate (``ema``; skipped when the
    batch's sums are not finite). The running sums are persistent buffers (checkpointed).
    """

    def __init__(self, psi: Sequence[int], estimate: str = "batch", ema_decay: float = 0.99):
        super().__init__()
        if estimate not in ENTROPY_ESTIMATES:
            raise ValueError(f"entropy_estimate must be one of {', '.join(ENTROPY_ESTIMATES)}, got {estimate!r}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"entropy_ema_decay must be in [0, 1), got {ema_decay!r}")
        self.estimate, self.ema_decay = estimate, float(ema_decay)
        self.num_classes, self.num_aux = len(psi), int(sum(psi))
        self.register_buffer("owner", aux_owner(psi), persistent=False)
        # ema: decayed sums of the generated distributions (per auxiliary class) and of the
        # sample counts (per primary class); their ratio is the running per-class mean
        self.register_buffer("ema_label_sum", torch.zeros(self.num_aux))
        self.register_buffer("ema_sample_count", torch.zeros(self.num_classes))

    def running_mean(self) -> torch.Tensor:
        """(A,) the running per-class mean label distribution (zeros for classes never seen)."""
        count = self.ema_sample_count[self.owner]
        return torch.where(count > 0, self.ema_label_sum / count.clamp_min(1e-30), torch.zeros_like(count))

    def forward(self, gen_log_probs: torch.Tensor, gather: Optional[Gather] = None,
                update: bool = True) -> torch.Tensor:
        with torch.autocast(device_type=gen_log_probs.device.type, enabled=False):
            p = at_least_float32(gen_log_probs).exp()
            local = torch.cat([p.sum(0), p.new_tensor([float(p.shape[0])])])
            world = 1
            total = local
            if gather is not None and self.estimate != "batch":
                stacked = gather(local.detach())
                world = int(stacked.shape[0])
                total = stacked.to(local.dtype).sum(0) + (local - local.detach())  # value: all ranks; grad: ours
            label_sum, samples = total[:-1], total[-1].detach().clamp_min(1.0)
            pbar = label_sum / samples
            if self.estimate != "ema":
                h = xlogx(pbar).sum()
            else:
                h = self._ema_term(label_sum, samples, update)
        if world > 1:  # averaging the ranks' generator gradients then gives d H / d phi
            h = h.detach() + world * (h - h.detach())
        return h

    def _ema_term(self, label_sum: torch.Tensor, samples: torch.Tensor, update: bool) -> torch.Tensor:
        beta = self.ema_decay
        sums = label_sum.detach()
        counts = torch.zeros(self.num_classes, dtype=sums.dtype, device=sums.device).index_add_(0, self.owner, sums)
        counts = counts.round()  # each sample's distribution sums to 1 over its own class's block
        run_sum = beta * self.ema_label_sum.to(sums.dtype) + sums
        run_count = beta * self.ema_sample_count.to(sums.dtype) + counts
        present = counts > 0
        mean = run_sum / run_count[self.owner].clamp_min(1e-30)  # m~: the estimate including this batch
        weight = counts / samples  # w_c: the batch's class frequencies
        value = (weight[self.owner] * xlogx(mean) * present[self.owner]).sum() + xlogx(weight).sum()
        # gradient: dH/dm~ = log m~ + 1 applied to the batch's own per-class mean (see maxl.py)
        slope = (mean.clamp_min(torch.finfo(mean.dtype).tiny).log() + 1.0) * present[self.owner]
        pbar = label_sum / samples
        surrogate = (slope.detach() * pbar).sum()
        if update and bool(torch.isfinite(sums).all()):
            with torch.no_grad():
                self.ema_label_sum.copy_(run_sum)
                self.ema_sample_count.copy_(run_count)
        return value.detach() + (surrogate - surrogate.detach())


# --------------------------------------------------------------------------------------
# label statistics
# --------------------------------------------------------------------------------------
#: keys of :func:`label_sums` (each a sum over samples; add them over batches and ranks)
LABEL_SUM_KEYS = ("counts", "soft_counts", "samples", "entropy", "entropy_frac", "frac_samples", "max_prob")


@torch.no_grad()
def label_sums(gen_log_probs: torch.Tensor, targets: torch.Tensor, psi: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Summable statistics of a batch of generated labels (float64):

    ``counts`` (A,) argmax histogram; ``soft_counts`` (A,) sum of the distributions; ``samples``;
    ``entropy`` sum of the per-sample entropies ``-sum_k p_k log p_k`` (nats); ``entropy_frac``
    sum of ``entropy / log psi[y]`` over the samples whose class has ``psi[y] > 1`` (a class
    with one auxiliary class has nothing to choose), counted in ``frac_samples``; ``max_prob``
    sum of ``max_k p_k``."""
    lp = at_least_float32(gen_log_probs).double()
    p = lp.exp()
    a = lp.shape[-1]
    psi_t = torch.as_tensor(list(psi), dtype=torch.float64, device=lp.device)[targets]
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    choice = psi_t > 1
    frac = torch.where(choice, ent / psi_t.clamp_min(2.0).log(), torch.zeros_like(ent))
    return {
        "counts": torch.bincount(lp.argmax(-1), minlength=a).double(),
        "soft_counts": p.sum(0),
        "samples": lp.new_tensor(float(lp.shape[0])),
        "entropy": ent.sum(),
        "entropy_frac": frac.sum(),
        "frac_samples": choice.double().sum(),
        "max_prob": p.max(-1).values.sum(),
    }


def label_metrics(sums: Dict[str, torch.Tensor], psi: Sequence[int]) -> Dict[str, object]:
    """Metrics from (summed) :func:`label_sums`: ``label_entropy``, ``label_entropy_frac``,
    ``label_max_prob`` (means over samples), ``label_fraction`` (share of auxiliary classes that
    are the argmax of at least one sample), ``label_marginal_entropy`` (per primary class seen:
    the entropy of its samples' mean distribution, nats; mean over classes) and
    ``label_marginal_entropy_frac`` (the same / log psi, classes with psi > 1), and the lists
    ``marginal_entropy`` (per class, None when unseen) and ``counts``."""
    counts = sums["counts"].double().cpu()
    soft = sums["soft_counts"].double().cpu()
    samples = max(float(sums["samples"]), 1.0)
    owner = aux_owner(psi)
    per_class_n = torch.zeros(len(psi), dtype=torch.float64).index_add_(0, owner, counts)
    marginal, marginal_frac = [], []
    offset = 0
    for c, k in enumerate(psi):
        n = float(per_class_n[c])
        if n <= 0:
            marginal.append(None)
        else:
            mean = soft[offset:offset + k] / n
            h = float(-xlogx(mean).sum())
            marginal.append(h)
            if k > 1:
                marginal_frac.append(h / math.log(k))
        offset += k
    seen = [h for h in marginal if h is not None]
    frac_samples = float(sums["frac_samples"])
    return {
        "label_entropy": float(sums["entropy"]) / samples,
        "label_entropy_frac": float(sums["entropy_frac"]) / frac_samples if frac_samples > 0 else 0.0,
        "label_max_prob": float(sums["max_prob"]) / samples,
        "label_fraction": float((counts > 0).double().mean()) if counts.numel() else 0.0,
        "label_marginal_entropy": sum(seen) / len(seen) if seen else 0.0,
        "label_marginal_entropy_frac": sum(marginal_frac) / len(marginal_frac) if marginal_frac else 0.0,
        "marginal_entropy": marginal,
        "counts": [int(c) for c in counts.round().long().tolist()],
    }
