"""MAXL's pure math: the hierarchy tensors, the mask softmax, the focal losses and the label statistics.

Kept apart from the method (``ssal_models.maxl``) because the networks, the meta step, the
collapse regulariser (``ssal_models.maxl_labels``) and the pipeline's label metrics all use
these functions and nothing here needs a module or a model.  Every loss is computed in float32
(float64 if given) with autocast off, from log-probabilities, so that fp16 logits never
overflow when exponentiated.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "aux_owner", "hierarchy_mask", "at_least_float32", "xlogx", "mask_log_softmax", "focal_loss",
    "soft_focal_loss", "entropy_term", "label_counts", "used_label_fraction",
]


# --------------------------------------------------------------------------------------
# hierarchy tensors
# --------------------------------------------------------------------------------------
def aux_owner(psi: Sequence[int]) -> torch.Tensor:
    """(A,) long: the primary class owning each auxiliary class (contiguous blocks)."""
    return torch.tensor([y for y, k in enumerate(psi) for _ in range(int(k))], dtype=torch.long)


def hierarchy_mask(psi: Sequence[int]) -> torch.Tensor:
    """(C, A) bool mask ``M[y, k] = k is one of y's auxiliary classes``."""
    owner = aux_owner(psi)
    return owner.unsqueeze(0) == torch.arange(len(psi)).unsqueeze(1)


# --------------------------------------------------------------------------------------
# numerics (all in float32 or wider, autocast off)
# --------------------------------------------------------------------------------------
def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if float32 / float64, else ``t`` in float32 (fp16 / bf16 logits)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def xlogx(t: torch.Tensor) -> torch.Tensor:
    """``t log t`` with ``0 log 0 = 0``."""
    return t * t.clamp_min(torch.finfo(t.dtype).tiny).log()


def mask_log_softmax(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log of the mask softmax ``p_k = exp(s_k) M[y,k] / sum_j exp(s_j) M[y,j]``.

    ``logits`` (N, A) any float dtype, ``targets`` (N,) primary labels, ``mask`` (C, A)
    bool.  Masked logits are set to -inf and a float32 (float64 if given) log-softmax
    is taken, so raw logits are never exponentiated: finite for logits ~1e4 in fp16.
    Returns (N, A) log-probabilities, -inf outside ``y``'s auxiliary set.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        m = mask.to(logits.device)[targets]
        return torch.log_softmax(at_least_float32(logits).masked_fill(~m, float("-inf")), dim=-1)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def focal_loss(log_probs: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               reduction: str = "mean") -> torch.Tensor:
    """Focal loss with hard labels: ``-(1 - p_y)^gamma log p_y`` from (N, C) log-probabilities."""
    with torch.autocast(device_type=log_probs.device.type, enabled=False):
        lp = at_least_float32(log_probs).gather(1, targets.long().unsqueeze(1)).squeeze(1)
        loss = -(1.0 - lp.exp()).clamp_min(0.0).pow(gamma) * lp
        return _reduce(loss, reduction)


def soft_focal_loss(log_probs: torch.Tensor, target_probs: torch.Tensor, gamma: float = 2.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Focal loss against soft labels: ``-sum_k t_k (1 - q_k)^gamma log q_k`` (the authors'
    ``model_fit(pri=False)``), ``log_probs`` = log q (N, A), ``target_probs`` = t (N, A)."""
    with torch.autocast(device_type=log_probs.device.type, enabled=False):
        lq = at_least_float32(log_probs)
        lq = lq.clamp_min(torch.finfo(lq.dtype).min)          # 0 * -inf guard
        t = target_probs.to(lq.dtype)
        loss = -(t * (1.0 - lq.exp()).clamp_min(0.0).pow(gamma) * lq).sum(-1)
        return _reduce(loss, reduction)


def entropy_term(gen_log_probs: torch.Tensor) -> torch.Tensor:
    """``H = sum_k pbar_k log pbar_k`` of the batch-mean generated distribution (<= 0;
    *adding* ``lambda * H`` to the generator's loss pushes it towards using every class)."""
    with torch.autocast(device_type=gen_log_probs.device.type, enabled=False):
        return xlogx(at_least_float32(gen_log_probs).exp().mean(0)).sum()


def label_counts(gen_log_probs: torch.Tensor) -> torch.Tensor:
    """(A,) long histogram of the generated labels' argmax."""
    a = gen_log_probs.shape[-1]
    return torch.bincount(gen_log_probs.argmax(-1), minlength=a)


def used_label_fraction(counts: torch.Tensor) -> float:
    """Fraction of auxiliary classes assigned to at least once (the supplementary's "Label %")."""
    return float((counts > 0).float().mean())
