"""MAXL: Meta AuXiliary Learning (Liu, Davison & Johns, 2019) -- the model side.

Specification: ``shared/METHODS.md`` section 3 and the MAXL supplementary; the
authors' public code (lorenmt/maxl: ``model_vgg_maxl.py``, second order, and
``model_vgg_maxl_firstorder.py``, finite differences) fixed the details the
texts leave open.  Pure PyTorch: no file I/O, no distributed code, no loop.

Pieces
------
* hierarchy ``psi`` (``ssal_models.hierarchies``): primary class ``y`` owns the
  auxiliary classes ``offset[y] .. offset[y] + psi[y] - 1``; :func:`hierarchy_mask`
  gives the ``(C, sum(psi))`` boolean mask ``M``.
* :func:`mask_log_softmax` -- the generator's mask softmax in log space.
* :func:`focal_loss` (hard labels) and :func:`soft_focal_loss` (soft labels), both
  from log-probabilities, gamma = 2; :func:`entropy_term` ``H = sum_k pbar_k log pbar_k``
  (the batch form); ``ssal_models.maxl_labels``: the collapse regulariser's three
  estimates (:class:`~ssal_models.maxl_labels.CollapseRegulariser`, ``method.collapse``)
  and the label statistics behind the pipeline's ``train/label_*`` metrics.
* :class:`MultiTaskNet` (backbone + primary head ``fc`` + auxiliary head ``aux_fc``),
  :class:`LabelGenerator` (backbone + MLP head -> ``sum(psi)`` logits),
  :class:`MaxlMethod` (losses, prediction rules, metrics, the meta step; owns the
  generator), :class:`MaxlModel` (standalone ``net`` + ``method``, any backbone builder)
  and :func:`build_maxl_method` (the models library's ``maxl`` method builder).

Forward / loss contract
-----------------------
``model(x)`` returns ``OrderedDict(main=(N, C) logits, aux=(N, A) logits,
gen=(N, A) raw generator logits)``; ``gen`` is computed under ``no_grad`` (the
multi-task step never trains the generator).  ``model.method.loss(out, y)`` is
``focal(main, y) + soft_focal(aux, p)`` with ``p = exp(mask_log_softmax(gen, y, M))``.

Meta step (``model.method.generator_step(model, x, y, ...)``, writes/accumulates ``.grad`` of the
generator's parameters only and never modifies the multi-task net, BN running
statistics included):

* ``meta_order="second"``: ``theta+ = theta - lr * (grad_theta L_train(theta, phi)
  [+ wd * theta + momentum * buf])`` with ``create_graph=True``, both forwards of the
  multi-task net through ``torch.func.functional_call`` in train mode (BN uses batch
  statistics; running statistics go to throw-away clones), then
  ``grad_phi [L_pri(theta+) + lambda * H(phi)]``.
* ``meta_order="first"``: the same gradient with the mixed second derivative
  replaced by a central finite difference (DARTS): ``theta +- eps * u`` with
  ``u = lr * grad L_pri(theta+)``, ``eps = fd_eps / ||u||`` (the authors' 0.01).
  Unlike the authors' first-order script, the entropy term's gradient is kept.
  Costs one forward/backward of the generator and four of the multi-task net
  (no double backward).

Collapse regulariser (option ``entropy_estimate``; ``../shared/METHODS.md`` section 3 notation)
----------------------------------------------------------------------------------------------
``p_i`` is sample ``i``'s mask-softmax distribution (``A = sum(psi)`` entries, zero outside the
block of its class ``y_i``), ``B`` this process's batch, ``G`` the global batch of the ``W``
ranks, ``n_c`` the number of samples of primary class ``c`` and ``w_c = n_c / |set|``.
Because the blocks are disjoint, ``sum_k pbar_k log pbar_k = sum_c w_c sum_{k in c} pbar_ck
log pbar_ck + sum_c w_c log w_c`` (``pbar_c``: the class's mean distribution): the term is
a class-frequency-weighted negative entropy of each class's mean label.

* ``batch`` (the authors', default): ``H = sum_k pbar_k log pbar_k``, ``pbar = mean_{i in B} p_i``.
  With ``n_c = 1`` (ImageNet: 1000 classes, 32-64 images per GPU) ``pbar_c`` is one sample's
  label, so ``H`` no longer measures collapse across samples: it pushes each label toward uniform.
* ``global``: the same ``H`` over ``G``: ``pbar = sum_{i in G} p_i / |G|`` from ``gather`` (the
  pipeline's all-gather of every rank's ``(sum_{i in B_r} p_i, |B_r|)``; one process: ``batch``).
  Gradient: through this rank's own ``p_i`` only (the other ranks' sums are constants),
  multiplied by ``W``, so that averaging the ranks' generator gradients (the pipeline does)
  gives ``grad_phi H(G) = sum_r dH/dp_{B_r} dp_{B_r}/dphi``.
* ``ema`` (*choice*): running per-class sums, decay ``beta`` = ``entropy_ema_decay`` (0.99) per
  generator step, over the global batch: ``s <- beta s + sum_{i in G} p_i`` (A,), ``z_c <- beta z_c
  + n_c(G)``; the estimate including this step is ``m_c = (beta s_c + sum_{i in G, y_i = c} p_i)
  / (beta z_c + n_c(G))`` (a class's first estimate is its batch mean: no pull toward uniform).
  Value: ``H = sum_{c in G} w_c sum_{k in c} m_ck log m_ck + sum_c w_c log w_c`` (``w_c`` over
  ``G``; ``beta = 0`` gives ``global``'s value). Gradient: ``sum_c w_c sum_{k in c} (log m_ck +
  1) grad_phi pbar_ck(G)``, i.e. the slope of ``x log x`` at the running estimate applied to the
  current batch's class means: the gradient through the current batch's contribution to
  ``m_c``, divided by that contribution's share ``n_c / (beta z_c + n_c)``, so that ``lambda``
  keeps the batch form's scale and ``beta = 0`` reproduces ``global``'s gradient exactly (times
  ``W`` across ranks, as there). The slope is the same for every auxiliary class of ``c`` when
  ``m_c`` is uniform: labels that are peaked but differ between a class's samples are left
  alone; a collapsed class (``m_c`` peaked) is pushed off its dominant label. The sums are
  updated once per generator step (skipped on non-finite input), identical on every rank (built
  from the gathered sums), persistent buffers of ``method.collapse`` (checkpointed) and kept
  out of DDP's buffer broadcast (:func:`ddp_ignore_generator`).

lr / weight decay / momentum of the virtual step come from ``net_optimizer``
(per parameter group; SGD momentum buffers as in the authors' first-order code)
or from ``lr=`` (plain SGD step, as in their second-order code).

One training iteration of each kind (the networks are updated in alternation --
supplementary section 5; the pipeline's option ``schedule``: ``interleave``, one generator
step after every ``generator_every``-th multi-task step on the same batch, or
``alternate_epochs``, the authors' code: a whole pass of multi-task steps, then a whole pass
of generator steps on fresh batches).  ``model`` is
``build_model(arch, "maxl", C, psi=5)`` (models library) or ``build_maxl_model(arch, C)``
(standalone :class:`MaxlModel`); the calls are the same for both::

    from ssal_models import maxl as mx
    opt_net = torch.optim.SGD(mx.multitask_parameters(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_gen = torch.optim.SGD(mx.generator_parameters(model), lr=1e-3, weight_decay=5e-4)
    # (a) multi-task step: an ordinary step (the generator's labels are constants)
    out = model(x)                                  # OrderedDict main, aux, gen
    total, parts = model.method.loss(out, y)        # parts: {"focal/main", "focal/aux"} (detached)
    opt_net.zero_grad(); total.backward(); opt_net.step()
    # (b) generator (meta) step: writes the generator's .grad only
    opt_gen.zero_grad()
    stats = model.method.generator_step(model, x, y, net_optimizer=opt_net)  # meta_loss, entropy_term, finite
    if stats["finite"]: opt_gen.step()              # (DDP: all-reduce the generator's grads first)

Epoch statistics: ``model.method.statistics(out, y)`` -> ``{"entropy_term": scalar,
"label_counts": (A,) argmax histogram}``; sum the counts over the epoch and
``used_label_fraction(counts)`` is the supplementary's "Label %" (the summed counts are
also the generator's label distribution, for the end-of-run artifact).
``model.method.extra_metrics(out, y)``: per-sample ``aux_acc`` (auxiliary head's
argmax equals the generated label's argmax) and ``aux_in_set``.
``model.method.predict(out)``: ``main`` and ``aux_sum`` (see :meth:`MaxlMethod.predict`).

Models library: :func:`register` registers :func:`build_maxl_method` as method
``maxl`` (``ssal_models/__init__.py`` calls it); the auxiliary head is the branch ``"aux"`` on ``layer4``, the
generator lives in ``model.method.generator``.  ``outputs["gen"]`` needs the model to
call ``model.method.extra_outputs(x, outputs)`` at the end of its forward.

DDP: :func:`ddp_ignore_generator` (done by :class:`MaxlModel`) lists the generator's
parameters/buffers in ``model._ddp_params_and_buffers_to_ignore`` (DDP neither
broadcasts nor reduces them; its forward never gives them gradients).  The engine must
all-reduce (average) the generator's gradients after ``generator_step`` and keep the
generator's initial weights identical on all ranks (same seed or a broadcast); the meta
step runs on each rank's own batch.  ``generator_step`` unwraps DDP / ``torch.compile``.
AMP: the losses are computed in float32 from log-probabilities; pass ``grad_scale``
(e.g. a GradScaler's current scale) to ``generator_step`` under float16 so the
meta-gradient does not underflow; ``stats["finite"]`` is False (no ``.grad`` written)
on inf/NaN.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .hierarchies import PsiSpec, make_psi
from .maxl_labels import ENTROPY_ESTIMATES, CollapseRegulariser, Gather

__all__ = [
    "hierarchy_mask", "aux_owner", "mask_log_softmax", "focal_loss", "soft_focal_loss",
    "entropy_term", "label_counts", "used_label_fraction", "MultiTaskNet", "LabelGenerator",
    "MaxlMethod", "MaxlModel", "torchvision_backbone", "build_maxl_model", "META_ORDERS",
]

META_ORDERS = ("second", "first")


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
def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mask_log_softmax(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log of the mask softmax ``p_k = exp(s_k) M[y,k] / sum_j exp(s_j) M[y,j]``.

    ``logits`` (N, A) any float dtype, ``targets`` (N,) primary labels, ``mask`` (C, A)
    bool.  Masked logits are set to -inf and a float32 (float64 if given) log-softmax
    is taken, so raw logits are never exponentiated: finite for logits ~1e4 in fp16.
    Returns (N, A) log-probabilities, -inf outside ``y``'s auxiliary set.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        m = mask.to(logits.device)[targets]
        return torch.log_softmax(_wide(logits).masked_fill(~m, float("-inf")), dim=-1)


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
        lp = _wide(log_probs).gather(1, targets.long().unsqueeze(1)).squeeze(1)
        loss = -(1.0 - lp.exp()).clamp_min(0.0).pow(gamma) * lp
        return _reduce(loss, reduction)


def soft_focal_loss(log_probs: torch.Tensor, target_probs: torch.Tensor, gamma: float = 2.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Focal loss against soft labels: ``-sum_k t_k (1 - q_k)^gamma log q_k`` (the authors'
    ``model_fit(pri=False)``), ``log_probs`` = log q (N, A), ``target_probs`` = t (N, A)."""
    with torch.autocast(device_type=log_probs.device.type, enabled=False):
        lq = _wide(log_probs)
        lq = lq.clamp_min(torch.finfo(lq.dtype).min)          # 0 * -inf guard
        t = target_probs.to(lq.dtype)
        loss = -(t * (1.0 - lq.exp()).clamp_min(0.0).pow(gamma) * lq).sum(-1)
        return _reduce(loss, reduction)


def entropy_term(gen_log_probs: torch.Tensor) -> torch.Tensor:
    """``H = sum_k pbar_k log pbar_k`` of the batch-mean generated distribution (<= 0;
    *adding* ``lambda * H`` to the generator's loss pushes it towards using every class)."""
    with torch.autocast(device_type=gen_log_probs.device.type, enabled=False):
        pbar = _wide(gen_log_probs).exp().mean(0)
        tiny = torch.finfo(pbar.dtype).tiny
        return (pbar * pbar.clamp_min(tiny).log()).sum()


def label_counts(gen_log_probs: torch.Tensor) -> torch.Tensor:
    """(A,) long histogram of the generated labels' argmax."""
    a = gen_log_probs.shape[-1]
    return torch.bincount(gen_log_probs.argmax(-1), minlength=a)


def used_label_fraction(counts: torch.Tensor) -> float:
    """Fraction of auxiliary classes assigned to at least once (the supplementary's "Label %")."""
    return float((counts > 0).float().mean())


# --------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------
BackboneBuilder = Callable[[str], Tuple[nn.Module, int]]


def torchvision_backbone(arch: str) -> Tuple[nn.Module, int]:
    """Randomly initialised torchvision ResNet without its ``fc``: ``(module, feature_dim)``.

    ``resnet10`` = BasicBlock ``[1, 1, 1, 1]`` (the default generator of the ResNet family).
    Stand-in until the models library's backbone builder is wired in (``backbone_builder=``).
    """
    import torchvision.models as tvm
    if arch == "resnet10":
        m = tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1])
    elif arch.startswith("resnet") or arch.startswith("wide_resnet") or arch.startswith("resnext"):
        m = getattr(tvm, arch)(weights=None)
    else:
        raise ValueError(f"torchvision_backbone: unsupported arch {arch!r}")
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def default_generator_arch(arch: str) -> str:
    """Small copy of the backbone family: ``resnet10`` for any ``resnet*``, else ``arch``."""
    return "resnet10" if arch.startswith("resnet") else arch


class MultiTaskNet(nn.Module):
    """backbone (x -> (N, D) features) + primary head ``fc`` (C) + auxiliary head ``aux_fc`` (A)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, num_aux: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        self.aux_fc = nn.Linear(feature_dim, num_aux)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        f = self.backbone(x).flatten(1)
        return OrderedDict(main=self.fc(f), aux=self.aux_fc(f))


class LabelGenerator(nn.Module):
    """backbone + head (``Linear-ReLU-Linear`` as in the authors' code, or one ``Linear``
    with ``hidden=0``) -> (N, A) raw logits; :meth:`log_probs` applies the mask softmax."""

    def __init__(self, backbone: nn.Module, feature_dim: int, psi: Sequence[int], hidden: Optional[int] = None):
        super().__init__()
        self.psi = tuple(int(k) for k in psi)
        a = sum(self.psi)
        hidden = feature_dim if hidden is None else int(hidden)
        self.backbone = backbone
        self.head = (nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, a))
                     if hidden > 0 else nn.Linear(feature_dim, a))
        self.register_buffer("mask", hierarchy_mask(self.psi), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))

    def log_probs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mask_log_softmax(self(x), targets, self.mask)


# --------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------
def _set_train(module: nn.Module, mode: bool) -> Dict[nn.Module, bool]:
    old = {m: m.training for m in module.modules()}
    module.train(mode)
    return old


def _restore_train(old: Dict[nn.Module, bool]) -> None:
    for m, t in old.items():
        m.training = t


class MaxlMethod(nn.Module):
    """Losses, prediction rules, metrics and the meta step of MAXL.

    Holds the label generator (a submodule, so ``state_dict`` has it); the multi-task
    net is passed to :meth:`generator_step` (``MaxlModel.generator_step`` does it).
    """

    name = "maxl"
    # duck-typed ssal_models.base.Method attributes (BranchedResNet / the engine read them)
    concat_branch_features = False
    aux_key = "aux"

    def __init__(self, generator: LabelGenerator, psi: Sequence[int], gamma: float = 2.0,
                 entropy_weight: float = 0.2, meta_order: str = "second", fd_eps: float = 0.01,
                 entropy_estimate: str = "batch", entropy_ema_decay: float = 0.99):
        super().__init__()
        if meta_order not in META_ORDERS:
            raise ValueError(f"meta_order must be one of {META_ORDERS}, got {meta_order!r}")
        self.branch_names = [self.aux_key]
        self.label_smoothing = 0.0     # not used: MAXL's losses are focal losses (supplementary 5)
        self._in_meta = False
        self.generator = generator
        self.psi = tuple(int(k) for k in psi)
        self.num_classes, self.num_aux = len(self.psi), sum(self.psi)
        self.gamma = float(gamma)
        self.entropy_weight = float(entropy_weight)
        self.meta_order = meta_order
        self.fd_eps = float(fd_eps)
        self.register_buffer("mask", hierarchy_mask(self.psi), persistent=False)
        self.register_buffer("owner", aux_owner(self.psi), persistent=False)
        self.collapse = CollapseRegulariser(self.psi, entropy_estimate, entropy_ema_decay)

    # ---- multi-task side -------------------------------------------------------------
    def extra_outputs(self, x: torch.Tensor, outputs: "OrderedDict[str, torch.Tensor]"):
        """Add ``outputs["gen"]`` = the generator's raw logits on the model's input ``x``
        (``no_grad``).  The model calls this at the end of its forward; skipped inside the
        meta step's functional forwards (they do not need it)."""
        if not self._in_meta:
            with torch.no_grad():
                outputs["gen"] = self.generator(x)
        return outputs

    def generated_log_probs(self, out: Dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """(N, A) masked log-probabilities of the generated labels, detached."""
        if "gen" not in out:
            raise KeyError("MAXL loss needs out['gen'] (the generator's logits): call MaxlModel.forward")
        return mask_log_softmax(out["gen"].detach(), targets, self.mask)

    def multitask_loss(self, out: Dict[str, torch.Tensor], targets: torch.Tensor,
                       aux_targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(primary focal loss, auxiliary soft focal loss against ``aux_targets`` probabilities)."""
        pri = focal_loss(F.log_softmax(_wide(out["main"]), -1), targets, self.gamma)
        aux = soft_focal_loss(F.log_softmax(_wide(out[self.aux_key]), -1), aux_targets, self.gamma)
        return pri, aux

    def loss(self, out: Dict[str, torch.Tensor], targets: torch.Tensor):
        """The multi-task net's loss ``L_pri + L_aux`` (generator labels are constants here)."""
        p = self.generated_log_probs(out, targets).exp()
        pri, aux = self.multitask_loss(out, targets, p)
        return pri + aux, {"focal/main": pri.detach(), "focal/aux": aux.detach()}

    def predict(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``main``: primary head; ``aux_sum`` (*our choice*, extra rule): auxiliary head's
        probabilities summed over each primary class's auxiliary set."""
        lq = F.log_softmax(_wide(out[self.aux_key]), -1)
        summed = torch.zeros(lq.shape[0], self.num_classes, dtype=lq.dtype, device=lq.device)
        summed.index_add_(1, self.owner, lq.exp())
        return {"main": F.log_softmax(_wide(out["main"]), -1), "aux_sum": summed.clamp_min(1e-30).log()}

    def extra_metrics(self, out: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per sample: ``aux_acc`` (aux head's argmax == generated label's argmax) and
        ``aux_in_set`` (aux head's argmax is one of the true class's auxiliary classes)."""
        gen = self.generated_log_probs(out, targets).argmax(-1)
        a = out[self.aux_key].argmax(-1)
        return {"aux_acc": a == gen, "aux_in_set": self.mask[targets, a]}

    @torch.no_grad()
    def statistics(self, out: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``entropy_term`` (H of this batch) and ``label_counts`` (A,) -- sum the counts
        over an epoch and apply :func:`used_label_fraction` for "Label %"."""
        g = self.generated_log_probs(out, targets)
        return {"entropy_term": entropy_term(g), "label_counts": label_counts(g)}

    # ---- meta step ---------------------------------------------------------------------
    def _inner_hparams(self, net: nn.Module, lr: Optional[float], optimizer: Optional[torch.optim.Optimizer]):
        """name -> (lr, weight_decay, momentum * buffer or None) for the virtual SGD step, for
        every trainable parameter of ``net`` that is not the generator's."""
        by_param = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    mom = group.get("momentum", 0.0) or 0.0
                    buf = optimizer.state.get(p, {}).get("momentum_buffer") if mom else None
                    by_param[p] = (float(group["lr"]) if lr is None else float(lr),
                                   float(group.get("weight_decay", 0.0) or 0.0),
                                   None if buf is None else (mom * buf).detach())
        elif lr is None:
            raise ValueError("generator_step needs lr= or net_optimizer=")
        hp = {}
        gen_ids = {id(p) for p in self.generator.parameters()}
        for n, p in net.named_parameters():
            if p.requires_grad and id(p) not in gen_ids:
                hp[n] = by_param.get(p, (float(lr) if lr is not None else 0.0, 0.0, None))
        return hp

    @staticmethod
    def _step(theta: torch.Tensor, grad: Optional[torch.Tensor], hp) -> torch.Tensor:
        lr, wd, mbuf = hp
        d = torch.zeros_like(theta) if grad is None else grad
        if wd:
            d = d + wd * theta
        if mbuf is not None:
            d = d + mbuf
        return theta - lr * d

    def _fwd(self, net: nn.Module, params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor], x):
        self._in_meta = True
        try:
            return functional_call(net, (params, buffers), (x,), strict=False)
        finally:
            self._in_meta = False

    def meta_objective(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
                       net_optimizer: Optional[torch.optim.Optimizer] = None, grad_scale: float = 1.0,
                       gather: Optional[Gather] = None, update: bool = True):
        """Second order: ``(L_pri(theta+), H)`` as differentiable functions of the generator's
        parameters (``theta+`` built with ``create_graph=True``).  ``net`` is put in train
        mode for the call (BN batch statistics) and its buffers are not modified.  ``H`` is the
        configured collapse estimate (``gather``: see :class:`CollapseRegulariser`)."""
        return self._second_order(net, x, y, lr, net_optimizer, grad_scale, gather, update)[:2]

    def _second_order(self, net, x, y, lr, net_optimizer, grad_scale, gather, update=True):
        """(meta loss, H, generated log-probs, (L_pri, L_aux) at theta)."""
        hp = self._inner_hparams(net, lr, net_optimizer)
        params = {n: p for n, p in net.named_parameters() if n in hp}
        old = _set_train(net, True)
        try:
            buffers = {n: b.clone() for n, b in net.named_buffers()}
            gen_lp = self.generator.log_probs(x, y)
            out = self._fwd(net, params, buffers, x)
            pri, aux = self.multitask_loss(out, y, gen_lp.exp())
            names = list(params)
            grads = torch.autograd.grad((pri + aux) * grad_scale, [params[n] for n in names],
                                        create_graph=True, allow_unused=True)
            fast = {n: self._step(params[n], None if g is None else g / grad_scale, hp[n])
                    for n, g in zip(names, grads)}
            out2 = self._fwd(net, fast, buffers, x)
            meta = focal_loss(F.log_softmax(_wide(out2["main"]), -1), y, self.gamma)
        finally:
            _restore_train(old)
        return meta, self.collapse(gen_lp, gather, update), gen_lp, (pri, aux)

    def _first_order(self, net, x, y, lr, net_optimizer, grad_scale, gather=None):
        """Finite-difference meta-gradient; returns (meta loss, H, surrogate, generated
        log-probs, (L_pri, L_aux) at theta) where ``grad_phi surrogate`` is the meta-gradient."""
        hp = self._inner_hparams(net, lr, net_optimizer)
        names = [n for n, p in net.named_parameters() if n in hp]
        theta = {n: p.detach() for n, p in net.named_parameters() if n in hp}
        old = _set_train(net, True)
        try:
            buffers = {n: b.clone() for n, b in net.named_buffers()}
            gen_lp = self.generator.log_probs(x, y)
            p = gen_lp.exp()
            pt = p.detach()

            def grads_wrt(params, target, wrt, parts=None):
                out = self._fwd(net, params, buffers, x)
                pri, aux = self.multitask_loss(out, y, target)
                if parts is not None:
                    parts.extend([pri.detach(), aux.detach()])
                g = torch.autograd.grad((pri + aux) * grad_scale, wrt, allow_unused=True)
                return [None if t is None else t / grad_scale for t in g]

            # virtual step theta+ (no graph)
            th = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            parts: list = []
            g = grads_wrt(th, pt, [th[n] for n in names], parts)
            with torch.no_grad():
                fast = {n: self._step(theta[n], gi, hp[n]).requires_grad_(True) for n, gi in zip(names, g)}
            out2 = self._fwd(net, fast, buffers, x)
            meta = focal_loss(F.log_softmax(_wide(out2["main"]), -1), y, self.gamma)
            d = torch.autograd.grad(meta * grad_scale, [fast[n] for n in names], allow_unused=True)
            # u = lr * dL_pri/dtheta+  (per parameter lr); d theta+/d p = -lr * d^2 L / dtheta dp
            u = {n: (torch.zeros_like(theta[n]) if di is None else di / grad_scale) * hp[n][0]
                 for n, di in zip(names, d)}
            norm = torch.sqrt(sum((v.double() ** 2).sum() for v in u.values()))
            if float(norm) > 0 and torch.isfinite(norm):
                eps = self.fd_eps / float(norm)
                gp = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        th = {n: theta[n] + sign * eps * u[n] for n in names}
                    leaf = pt.clone().requires_grad_(True)
                    gp.append(grads_wrt(th, leaf, [leaf])[0])
                v = -(gp[0] - gp[1]) / (2.0 * eps)
            elif torch.isfinite(norm):
                v = torch.zeros_like(pt)
            else:  # dL_pri/dtheta+ overflowed (fp16): the meta-gradient is unknown, not zero
                v = torch.full_like(pt, float("nan"))
        finally:
            _restore_train(old)
        h = self.collapse(gen_lp, gather)
        surrogate = (p * v.detach()).sum() + self.entropy_weight * h
        return meta.detach(), h, surrogate, gen_lp, tuple(parts)

    def generator_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
                       net_optimizer: Optional[torch.optim.Optimizer] = None, grad_scale: float = 1.0,
                       accumulate: bool = True, gather: Optional[Gather] = None) -> Dict[str, torch.Tensor]:
        """Meta-gradient of ``L_pri(theta+) + lambda * H`` w.r.t. the generator, added to
        (``accumulate``) or written into the generator parameters' ``.grad``.

        Does not step any optimiser and leaves ``net`` (parameters, ``.grad``, BN buffers)
        untouched; advances the collapse estimate's running state (``ema``).  ``gather``: the
        all-gather of a multi-process run (``global`` / ``ema``; see the module docstring).
        Returns detached tensors: ``meta_loss``, ``entropy_term`` (the estimate's ``H``),
        ``finite``, ``gen_log_probs`` (the labels of this batch before the step) and
        ``focal/main``, ``focal/aux`` (the multi-task losses at the current ``theta``).
        """
        net = _unwrap(net)
        gparams = [p for p in self.generator.parameters() if p.requires_grad]
        if self.meta_order == "second":
            # the double backward multiplies the inner (create_graph) and the outer gradient's
            # scales: sqrt(s) each keeps the product at s, the scale the GradScaler found safe for
            # the net's own backward (s each gives s^2: inf in fp16 at any usual scale)
            grad_scale = grad_scale ** 0.5
            meta, h, gen_lp, parts = self._second_order(net, x, y, lr, net_optimizer, grad_scale, gather)
            total = meta + self.entropy_weight * h
        else:
            meta, h, total, gen_lp, parts = self._first_order(net, x, y, lr, net_optimizer, grad_scale, gather)
        grads = torch.autograd.grad(total * grad_scale, gparams, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g / grad_scale for p, g in zip(gparams, grads)]
        # a non-finite meta loss counts too: the first-order path then drops its meta part (v = 0)
        # and would step on the entropy term alone
        finite = torch.stack([torch.isfinite(g).all() for g in grads] + [torch.isfinite(meta).all()]).all()
        if bool(finite):
            for p, g in zip(gparams, grads):
                if accumulate and p.grad is not None:
                    p.grad.add_(g)
                else:
                    p.grad = g.detach().clone()
        return {"meta_loss": meta.detach(), "entropy_term": h.detach(), "finite": finite,
                "gen_log_probs": gen_lp.detach(), "focal/main": parts[0].detach(), "focal/aux": parts[1].detach()}


class MaxlModel(nn.Module):
    """Standalone model: ``net`` (multi-task) + ``method`` (owns the generator).
    ``forward(x)`` -> ``OrderedDict(main, aux, gen)``; ``gen`` under ``no_grad``."""

    def __init__(self, net: nn.Module, method: MaxlMethod):
        super().__init__()
        self.net = net
        self.method = method
        ddp_ignore_generator(self)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.method.extra_outputs(x, self.net(x))

    def multitask_parameters(self) -> List[nn.Parameter]:
        return multitask_parameters(self)

    def generator_parameters(self) -> List[nn.Parameter]:
        return generator_parameters(self)

    def generator_step(self, x: torch.Tensor, y: torch.Tensor, **kw) -> Dict[str, torch.Tensor]:
        """See :meth:`MaxlMethod.generator_step` (kw: ``lr``, ``net_optimizer``, ``grad_scale``)."""
        return self.method.generator_step(self.net, x, y, **kw)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def generator_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The label generator's parameters (its own optimiser)."""
    return list(_unwrap(model).method.generator.parameters())


def multitask_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter of ``model`` except the generator's (the multi-task optimiser)."""
    gen = {id(p) for p in generator_parameters(model)}
    return [p for p in _unwrap(model).parameters() if id(p) not in gen]


def ddp_ignore_generator(model: nn.Module) -> List[str]:
    """List the generator's parameters and buffers in ``model._ddp_params_and_buffers_to_ignore``
    (DDP then neither broadcasts nor all-reduces them, and does not wait for their gradients,
    which the multi-task backward never produces), and the collapse estimate's running state
    (identical on every rank by construction).  Call before wrapping in DDP; the engine
    all-reduces the generator's gradients itself after :meth:`MaxlMethod.generator_step`."""
    method = _unwrap(model).method
    gen = method.generator
    ids = {id(t) for t in gen.parameters()} | {id(t) for t in gen.buffers()}
    ids |= {id(t) for t in method.collapse.buffers()}
    names = [n for n, t in model.named_parameters() if id(t) in ids]
    names += [n for n, t in model.named_buffers() if id(t) in ids]
    old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = old + [n for n in names if n not in old]
    return names


def resolve_psi(num_classes: int, psi) -> List[int]:
    """``make_psi`` plus ``"cifar100:P-A"`` (CIFAR-100 levels, e.g. ``"cifar100:20-100"``)."""
    if isinstance(psi, str):
        name, _, levels = psi.partition(":")
        if name != "cifar100" or "-" not in levels:
            raise ValueError(f"maxl: psi string must look like 'cifar100:20-100', got {psi!r}")
        from .hierarchies import cifar100_psi
        pri, aux = (int(v) for v in levels.split("-"))
        out = cifar100_psi(pri, aux)
        if len(out) != num_classes:
            raise ValueError(f"maxl: psi {psi!r} is for {len(out)} primary classes, the model has {num_classes}")
        return out
    return make_psi(num_classes, psi)


def build_maxl_model(arch: str, num_classes: int, psi: PsiSpec = None, *,
                     generator_arch: Optional[str] = None, generator_hidden: Optional[int] = None,
                     backbone_builder: Optional[BackboneBuilder] = None, gamma: float = 2.0,
                     entropy_weight: float = 0.2, meta_order: str = "second", fd_eps: float = 0.01,
                     entropy_estimate: str = "batch", entropy_ema_decay: float = 0.99) -> MaxlModel:
    """Multi-task net on ``arch`` + label generator on ``generator_arch`` (default: the
    family's small copy, :func:`default_generator_arch`).

    ``psi``: ``None`` (5 per class), an int, or a list of ``num_classes`` counts (see
    ``ssal_models.hierarchies``).  ``backbone_builder(arch) -> (module, feature_dim)``
    defaults to :func:`torchvision_backbone`; the models library passes its own.
    """
    psi = resolve_psi(num_classes, psi)
    build = backbone_builder or torchvision_backbone
    body, dim = build(arch)
    net = MultiTaskNet(body, dim, num_classes, sum(psi))
    garch = generator_arch or default_generator_arch(arch)
    try:
        gbody, gdim = build(garch)
    except (KeyError, ValueError, AttributeError):
        if generator_arch is not None:
            raise
        gbody, gdim = build(arch)
    gen = LabelGenerator(gbody, gdim, psi, hidden=generator_hidden)
    method = MaxlMethod(gen, psi, gamma=gamma, entropy_weight=entropy_weight, meta_order=meta_order, fd_eps=fd_eps,
                        entropy_estimate=entropy_estimate, entropy_ema_decay=entropy_ema_decay)
    return MaxlModel(net, method)


# --------------------------------------------------------------------------------------
# models-library integration: build_model(arch, "maxl", num_classes, **options)
# --------------------------------------------------------------------------------------
MAXL_OPTIONS = ("psi", "generator_arch", "generator_hidden", "gamma", "entropy_weight", "meta_order", "fd_eps",
                "entropy_estimate", "entropy_ema_decay")

#: Options that belong to the training, not to the model (read by ``pipeline.maxl_training``):
#: validated here, stored with their defaults in ``method.training_options``.
#: ``generator_lr`` (absolute peak lr, not scaled with the batch), ``generator_weight_decay``,
#: ``generator_momentum`` (SGD of the generator; supplementary: lr 1e-3, wd 5e-4, no momentum)
#: ``generator_every`` (``interleave``: one generator meta step after every N-th multi-task step;
#: 0: never) and ``schedule`` (:data:`SCHEDULES`: ``interleave``, or ``alternate_epochs``, the
#: authors' whole-epoch alternation: even epochs (0, 2, ...) train the multi-task net only, odd
#: epochs the generator only, one meta step per batch of its own, fresh batches).
TRAINING_OPTIONS = {"generator_lr": 1e-3, "generator_weight_decay": 5e-4, "generator_momentum": 0.0,
                    "generator_every": 1, "schedule": "interleave"}
SCHEDULES = ("interleave", "alternate_epochs")


def training_options(options: Dict) -> Dict:
    """The training options of ``options`` (defaults filled in), validated (``ValueError``)."""
    out = dict(TRAINING_OPTIONS)
    for key, default in TRAINING_OPTIONS.items():
        v = options.get(key, default)
        if key == "schedule":
            if v not in SCHEDULES:
                raise ValueError(f"maxl: option 'schedule' must be one of {', '.join(SCHEDULES)}, got {v!r}")
            out[key] = v
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"maxl: option {key!r} must be an integer >= 0, got {v!r}")
            out[key] = int(v)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise ValueError(f"maxl: option {key!r} must be a finite number >= 0, got {v!r}")
            out[key] = float(v)
    if not out["generator_lr"] > 0:
        raise ValueError(f"maxl: option 'generator_lr' must be > 0, got {out['generator_lr']!r}")
    return out


class AuxHead(nn.Module):
    """Auxiliary head on a (N, D, H, W) feature map: global average pool + Linear(D, A)."""

    def __init__(self, feature_dim: int, num_aux: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_aux)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def build_maxl_method(info, num_classes: int, options: Dict):
    """``ssal_models.base`` method builder: the auxiliary head as a branch named ``"aux"`` on
    ``layer4`` (the shared pooled features, like the main ``fc``) and a :class:`MaxlMethod`
    owning the generator (``generator_arch`` default: :func:`default_generator_arch`, built
    with :func:`torchvision_backbone`; the backbone's capacity options size the auxiliary
    head through ``info.feature_dim``, not the generator).  Options: see :data:`MAXL_OPTIONS` (``psi`` accepts
    ``None`` / int / list / ``"cifar100:P-A"``) and the training's :data:`TRAINING_OPTIONS`
    (validated, kept in ``method.training_options``).  Needs the model to call
    ``method.extra_outputs(x, outputs)`` at the end of its forward (``outputs["gen"]``)."""
    from .base import BranchSpec, MethodBuild, check_options
    check_options("maxl", options, MAXL_OPTIONS + tuple(TRAINING_OPTIONS))
    train_opts = training_options(options)
    psi = resolve_psi(num_classes, options.get("psi"))
    meta_order = options.get("meta_order", "second")
    if meta_order not in META_ORDERS:
        raise ValueError(f"maxl: option 'meta_order' must be one of {', '.join(META_ORDERS)}, got {meta_order!r}")
    floats = {}
    for key, default, lo in (("gamma", 2.0, 0.0), ("entropy_weight", 0.2, 0.0), ("fd_eps", 0.01, 1e-12),
                             ("entropy_ema_decay", 0.99, 0.0)):
        v = options.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= lo) or v != v or v == float("inf"):
            raise ValueError(f"maxl: option {key!r} must be a finite number >= {lo}, got {v!r}")
        floats[key] = float(v)
    if not floats["entropy_ema_decay"] < 1:
        raise ValueError(f"maxl: option 'entropy_ema_decay' must be in [0, 1), got {floats['entropy_ema_decay']!r}")
    estimate = options.get("entropy_estimate", "batch")
    if estimate not in ENTROPY_ESTIMATES:
        raise ValueError(f"maxl: option 'entropy_estimate' must be one of {', '.join(ENTROPY_ESTIMATES)}, "
                         f"got {estimate!r}")
    garch = options.get("generator_arch") or default_generator_arch(info.arch)
    gbody, gdim = torchvision_backbone(garch)
    gen = LabelGenerator(gbody, gdim, psi, hidden=options.get("generator_hidden"))
    method = MaxlMethod(gen, psi, meta_order=meta_order, entropy_estimate=estimate, **floats)
    method.training_options = train_opts
    return MethodBuild(method=method, branches=[BranchSpec(MaxlMethod.aux_key, "layer4",
                                                           AuxHead(info.feature_dim, sum(psi)))])


def register() -> None:
    """Register :func:`build_maxl_method` as the models library's method ``maxl`` (idempotent).
    Not done at import, so that importing this module never changes the global registry;
    ``ssal_models/__init__.py`` calls it."""
    from .base import METHODS, register_method
    if "maxl" not in METHODS:
        register_method("maxl")(build_maxl_method)
