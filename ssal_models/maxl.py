"""MAXL: Meta AuXiliary Learning (Liu, Davison & Johns, 2019) -- the model side.

Specification: ``shared/METHODS.md`` section 3 and the MAXL supplementary; the
authors' public code (lorenmt/maxl: ``model_vgg_maxl.py``, second order, and
``model_vgg_maxl_firstorder.py``, finite differences) fixed the details the
texts leave open.  Pure PyTorch: no file I/O, no distributed code, no loop.

Pieces
------
* hierarchy ``psi`` (``ssal_models.hierarchies``): primary class ``y`` owns the
  auxiliary classes ``offset[y] .. offset[y] + psi[y] - 1``; ``hierarchy_mask`` gives the
  ``(C, sum(psi))`` boolean mask ``M``.
* ``ssal_models.maxl_losses``: the math -- ``hierarchy_mask``, ``mask_log_softmax`` (the
  generator's mask softmax in log space), ``focal_loss`` (hard labels) and ``soft_focal_loss``
  (soft labels), both from log-probabilities, gamma = 2; ``entropy_term``
  ``H = sum_k pbar_k log pbar_k`` (the batch form), ``label_counts``, ``used_label_fraction``.
* ``ssal_models.maxl_labels``: the collapse regulariser's three estimates
  (:class:`~ssal_models.maxl_labels.CollapseRegulariser`, ``method.collapse``) and the label
  statistics behind the pipeline's ``train/label_*`` metrics.
* ``ssal_models.maxl_nets``: ``MultiTaskNet`` (backbone + primary head ``fc`` + auxiliary head
  ``aux_fc``), ``LabelGenerator`` (backbone + MLP head -> ``sum(psi)`` logits), ``AuxHead``.
* ``ssal_models.maxl_meta``: the meta step (``MetaStep``, mixed into :class:`MaxlMethod`).
* here: :class:`MaxlMethod` (losses, prediction rules, metrics; owns the generator),
  :class:`MaxlModel` (standalone ``net`` + ``method``, any backbone builder) and
  :func:`build_maxl_method` (the models library's ``maxl`` method builder).

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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hierarchies import PsiSpec, make_psi
from .maxl_labels import ENTROPY_ESTIMATES, CollapseRegulariser
from .maxl_losses import (at_least_float32, aux_owner, entropy_term, focal_loss, hierarchy_mask, label_counts,
                          mask_log_softmax, soft_focal_loss, used_label_fraction)
from .maxl_meta import META_ORDERS, MetaStep
from .maxl_nets import (AuxHead, BackboneBuilder, LabelGenerator, MultiTaskNet, default_generator_arch,
                        torchvision_backbone, unwrap)

__all__ = [
    "MaxlMethod", "MaxlModel", "build_maxl_model", "build_maxl_method", "register", "resolve_psi",
    "generator_parameters", "multitask_parameters", "ddp_ignore_generator", "training_options",
    "TRAINING_OPTIONS", "SCHEDULES", "MAXL_OPTIONS",
    # the pipeline's label statistics read these through this module
    "entropy_term", "mask_log_softmax", "used_label_fraction",
]


class MaxlMethod(MetaStep, nn.Module):
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
        pri = focal_loss(F.log_softmax(at_least_float32(out["main"]), -1), targets, self.gamma)
        aux = soft_focal_loss(F.log_softmax(at_least_float32(out[self.aux_key]), -1), aux_targets, self.gamma)
        return pri, aux

    def loss(self, out: Dict[str, torch.Tensor], targets: torch.Tensor):
        """The multi-task net's loss ``L_pri + L_aux`` (generator labels are constants here)."""
        p = self.generated_log_probs(out, targets).exp()
        pri, aux = self.multitask_loss(out, targets, p)
        return pri + aux, {"focal/main": pri.detach(), "focal/aux": aux.detach()}

    def predict(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``main``: primary head; ``aux_sum`` (*our choice*, extra rule): auxiliary head's
        probabilities summed over each primary class's auxiliary set."""
        lq = F.log_softmax(at_least_float32(out[self.aux_key]), -1)
        summed = torch.zeros(lq.shape[0], self.num_classes, dtype=lq.dtype, device=lq.device)
        summed.index_add_(1, self.owner, lq.exp())
        return {"main": F.log_softmax(at_least_float32(out["main"]), -1), "aux_sum": summed.clamp_min(1e-30).log()}

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


def generator_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The label generator's parameters (its own optimiser)."""
    return list(unwrap(model).method.generator.parameters())


def multitask_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter of ``model`` except the generator's (the multi-task optimiser)."""
    gen = {id(p) for p in generator_parameters(model)}
    return [p for p in unwrap(model).parameters() if id(p) not in gen]


def ddp_ignore_generator(model: nn.Module) -> List[str]:
    """List the generator's parameters and buffers in ``model._ddp_params_and_buffers_to_ignore``
    (DDP then neither broadcasts nor all-reduces them, and does not wait for their gradients,
    which the multi-task backward never produces), and the collapse estimate's running state
    (identical on every rank by construction).  Call before wrapping in DDP; the engine
    all-reduces the generator's gradients itself after :meth:`MaxlMethod.generator_step`."""
    method = unwrap(model).method
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

#: Options that belong to the training, not to the model (read by ``pipeline.train.maxl_training``):
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
