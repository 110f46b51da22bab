"""SSAL, Self-Supervised Autogenous Learning (METHODS.md §1): group-classifying branches,
their loss, and the prediction rules +TR / +JP / +LC.

Options of ``build_model(arch, "ssal", C, ...)``
-------------------------------------------------
* ``groupings`` (required): one length-``C`` integer sequence per branch, ``γ_i`` (see
  :mod:`ssal_models.grouping`); branch ``i`` classifies ``k_i = max(γ_i) + 1`` groups.
* ``stages``: tap point of each branch (``layer1``..``layer4`` or ``layerN.i``).  Default by
  number of branches: 1 -> ``[layer3]``, 2 -> ``[layer2, layer3]``, 3 -> ``[layer1, layer2,
  layer3]`` (the paper's ImageNet ResNet-50 layout); more branches need explicit stages.
* ``eta``: the power η of the branch probabilities in the joint rule.  Default 1.0 for one or
  two branches (the paper's one- and two-branch models), 0.3 for three or more (the authors'
  ImageNet code).
* ``loss_weights``: ``[λ_f, λ_1, ..., λ_n]`` (main first) or one number for all; default 1.
* ``head``: ``light`` (default, :class:`SSALHead` below) or ``authors``: the authors' own
  ImageNet heads, layer for layer (:mod:`ssal_models.authors_heads`; ResNet-50 x3: 11.9 M
  parameters, 46.5 % of the backbone, against 2.0 M for ``light``; inputs >= 64 px).
* ``widths`` (``light`` only): base width ``w`` of each branch head; default the planes of the
  stage it reads (``layer1`` 64, ``layer2`` 128, ``layer3`` 256, ``layer4`` 512, for every arch;
  times the backbone's ``width_multiplier``, rounded, e.g. 96 / 192 / 384 / 768 at 1.5).

The ``light`` branch head (:class:`SSALHead`), a small Inception-style conv head after its tap point::

    1x1 conv C_in -> w, BN, ReLU                     (cheap: squeezes the wide tap first)
    3x3 conv stride 2, w -> w, BN, ReLU  x n_down     n_down = 2 on a stride-4 tap (layer1),
                                                      else 1 (the authors' extra stride-2
                                                      conv after layer1)
    Inception-like block -> 2w channels:  [1x1 w -> w]  ||  [1x1 w -> w/2, 3x3 w/2 -> w]
    global average pooling, Linear 2w -> k_i

Cost with the default widths (224 px, ImageNet groupings 200/334/500, forward multiply-adds
and parameters of the heads after layer1 / layer2 / layer3):

* ResNet-50 (w = 64/128/256): 0.092 + 0.100 + 0.100 = 0.29 GMAC, 7 % of the backbone's
  4.09 GMAC; 0.14 + 0.40 + 1.50 = 2.04 M parameters, 8 % of its 25.6 M.
* ResNet-18 (same widths): 0.054 + 0.061 + 0.061 = 0.18 GMAC, 10 % of its 1.81 GMAC;
  1.79 M parameters, 15 % of its 11.7 M.
Measured training-step time on CPU (``bench/branch_overhead.py``, 112 px): SSAL x3 on ResNet-50
1.07x the plain backbone (target <= 1.20x), ResNet-18 1.20x.

Loss: ``L = λ_f·CE(f, y) + Σ_i λ_i·CE(g_i, γ_i(y))`` (float32, label smoothing applied to every
term when the engine sets ``method.label_smoothing``).  Parts: ``ce/main``, ``ce/ssal.i``.

Prediction rules (``predict``), log-probabilities over the C classes:

* ``main`` (+TR): ``log_softmax(f)``;
* ``joint`` (+JP): ``log_softmax( log_softmax(f) + η·Σ_i log_softmax(g_i)[:, γ_i] )``, i.e.
  ``p(c|x) ∝ softmax(f)_c · Π_i softmax(g_i)_{γ_i(c)}^η``;
* ``lc`` (+LC), once a :class:`LinearCombinationHead` is attached with
  :meth:`SSALMethod.set_linear_combination` (fit it with :func:`fit_linear_combination` on
  frozen outputs).
Each branch's group accuracy is an extra metric, ``group_top1/ssal.i``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .authors_heads import AuthorsSSALHead, pool_level
from .backbones import STAGES, BackboneInfo, init_like_torchvision
from .base import (BranchSpec, Method, MethodBuild, Outputs, check_options, cross_entropy, float_list,
                   log_probs, positive_float, register_method, stage_list)
from .grouping import validate_grouping

DEFAULT_STAGES = {1: ["layer3"], 2: ["layer2", "layer3"], 3: ["layer1", "layer2", "layer3"]}
HEADS = ("light", "authors")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InceptionBlock(nn.Module):
    """Two parallel paths concatenated: a 1x1 conv, and a 1x1 bottleneck then a 3x3 conv."""

    def __init__(self, width: int):
        super().__init__()
        self.pointwise = conv_bn_relu(width, width, 1)
        self.spatial = nn.Sequential(conv_bn_relu(width, max(width // 2, 1), 1),
                                     conv_bn_relu(max(width // 2, 1), width, 3))
        self.out_channels = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pointwise(x), self.spatial(x)], dim=1)


class SSALHead(nn.Module):
    """The SSAL branch (see the module docstring).  With ``num_outputs=None`` it returns its
    pooled ``2w`` features instead of logits (GapCat)."""

    def __init__(self, in_channels: int, width: int, num_downsamples: int, num_outputs: Optional[int]):
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, width, 1)
        self.downsample = nn.Sequential(*[conv_bn_relu(width, width, 3, stride=2) for _ in range(num_downsamples)])
        self.mix = InceptionBlock(width)
        self.feature_dim = self.mix.out_channels
        self.classifier = nn.Linear(self.feature_dim, num_outputs) if num_outputs is not None else None
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(F.adaptive_avg_pool2d(self.mix(self.downsample(self.reduce(x))), 1), 1)
        return features if self.classifier is None else self.classifier(features)


def head_downsamples(info: BackboneInfo, tap: str) -> int:
    return 2 if info.tap_stride(tap) <= 4 else 1


def parse_layout(method: str, info: BackboneInfo, options: Dict[str, Any],
                 default_branches: int = 3) -> Tuple[str, List[str], List[int], Optional[List[np.ndarray]]]:
    """``(head, stages, widths, groupings)`` from the SSAL-layout options (shared with GapCat)."""
    head = options.get("head", "light")
    if head not in HEADS:
        raise ValueError(f"{method}: option 'head' must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "authors" and "widths" in options:
        raise ValueError(f"{method}: option 'widths' sizes the light heads; the authors' heads "
                         f"have fixed widths (drop 'widths' or use head: light)")
    groupings = None
    if "groupings" in options:
        value = options["groupings"]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
                or np.ndim(value[0]) != 1:
            raise ValueError(f"{method}: option 'groupings' must be a non-empty list of groupings "
                             f"(one length-C integer sequence per branch)")
        groupings = [validate_grouping(g, None, f"{method}: groupings[{i}]") for i, g in enumerate(value)]
    if "stages" in options:
        stages = stage_list(method, info, options["stages"])
    else:
        count = len(groupings) if groupings is not None else default_branches
        if count not in DEFAULT_STAGES:
            raise ValueError(f"{method}: {count} branches have no default stages; set option 'stages' "
                             f"(one of {', '.join(info.valid_taps())} per branch)")
        stages = list(DEFAULT_STAGES[count])
    if groupings is not None and len(groupings) != len(stages):
        raise ValueError(f"{method}: {len(groupings)} groupings but {len(stages)} stages; give one stage per grouping")
    if "widths" in options:
        value = options["widths"]
        if not isinstance(value, (list, tuple)) or len(value) != len(stages) or not all(
                isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 2 for w in value):
            raise ValueError(f"{method}: option 'widths' must be {len(stages)} integers >= 2 "
                             f"(one per branch), got {value!r}")
        widths = [int(w) for w in value]
    else:
        widths = [info.stage_planes(STAGES.index(tap.split(".")[0])) for tap in stages]
    return head, stages, widths, groupings


# ----------------------------------------------------------------------------- method


class SSALMethod(Method):
    name = "ssal"

    def __init__(self, num_classes: int, branch_names: Sequence[str], groupings: Sequence[np.ndarray],
                 eta: float, loss_weights: Sequence[float]):
        super().__init__(num_classes, branch_names)
        self.eta = float(eta)
        self.loss_weights = [float(w) for w in loss_weights]
        self.num_groups = [int(g.max()) + 1 for g in groupings]
        for index, grouping in enumerate(groupings):
            # buffers: .to(device) moves them, and a checkpoint records the groupings used
            self.register_buffer(f"class_to_group_{index}", torch.as_tensor(grouping, dtype=torch.long))
        self.lc_head: Optional[LinearCombinationHead] = None

    def class_to_group(self, index: int) -> torch.Tensor:
        return getattr(self, f"class_to_group_{index}")

    def loss(self, outputs: Outputs, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ce_main = cross_entropy(outputs["main"], targets, self.label_smoothing)
        total = self.loss_weights[0] * ce_main
        parts = {"ce/main": ce_main.detach()}
        for index, name in enumerate(self.branch_names):
            ce = cross_entropy(outputs[name], self.class_to_group(index)[targets], self.label_smoothing)
            total = total + self.loss_weights[index + 1] * ce
            parts[f"ce/{name}"] = ce.detach()
        return total, parts

    def joint_scores(self, outputs: Outputs) -> torch.Tensor:
        """Unnormalised +JP log-scores ``log_softmax(f) + η·Σ_i log_softmax(g_i)[:, γ_i]``."""
        score = log_probs(outputs["main"])
        for index, name in enumerate(self.branch_names):
            score = score + self.eta * log_probs(outputs[name]).index_select(1, self.class_to_group(index))
        return score

    def predict(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        rules = {"main": log_probs(outputs["main"]),
                 "joint": F.log_softmax(self.joint_scores(outputs), dim=1)}
        if self.lc_head is not None:
            rules["lc"] = F.log_softmax(self.lc_head(self.lc_features(outputs)), dim=1)
        return rules

    def extra_metrics(self, outputs: Outputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {f"group_top1/{name}": outputs[name].argmax(dim=1) == self.class_to_group(index)[targets]
                for index, name in enumerate(self.branch_names)}

    # ---- +LC

    def lc_features(self, outputs: Outputs) -> torch.Tensor:
        """Input of the +LC head: ``[log_softmax(f), log_softmax(g_1), ...]`` (N, C + Σk)."""
        return torch.cat([log_probs(outputs["main"])] + [log_probs(outputs[n]) for n in self.branch_names], dim=1)

    def new_linear_combination(self) -> "LinearCombinationHead":
        """A +LC head initialised to reproduce the +JP rule exactly (so fitting starts there)."""
        head = LinearCombinationHead(self.num_classes, self.num_groups).to(self.class_to_group(0).device)
        head.init_as_joint([self.class_to_group(i) for i in range(len(self.branch_names))], self.eta)
        return head

    def set_linear_combination(self, head: Optional["LinearCombinationHead"]) -> None:
        if head is not None and (head.num_classes, head.num_groups) != (self.num_classes, self.num_groups):
            raise ValueError(f"LC head for {head.num_classes} classes / groups {head.num_groups} does not fit "
                             f"this model ({self.num_classes} classes / groups {self.num_groups})")
        self.lc_head = head

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.num_groups}, eta={self.eta}, loss_weights={self.loss_weights}"


class LinearCombinationHead(nn.Module):
    """+LC: one linear layer from the concatenated log-probabilities of ``f`` and every ``g_i``
    (``C + Σ k_i`` inputs) to ``C`` class scores, fitted after training with the rest frozen."""

    def __init__(self, num_classes: int, num_groups: Sequence[int]):
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_groups = [int(k) for k in num_groups]
        self.linear = nn.Linear(self.num_classes + sum(self.num_groups), self.num_classes)

    @torch.no_grad()
    def init_as_joint(self, class_to_group: Sequence[torch.Tensor], eta: float) -> None:
        """Weights that make the head compute the +JP scores: identity on ``f``'s block, and
        ``η·onehot(γ_i)`` on branch i's block (a gather is a linear map)."""
        weight = torch.zeros_like(self.linear.weight)
        weight[:, :self.num_classes] = torch.eye(self.num_classes)
        offset = self.num_classes
        for gamma, k in zip(class_to_group, self.num_groups):
            rows = torch.arange(self.num_classes, device=weight.device)
            weight[rows, offset + gamma.to(weight.device)] = eta
            offset += k
        self.linear.weight.copy_(weight)
        self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.float())


def fit_linear_combination(method: SSALMethod, outputs: Outputs, targets: torch.Tensor, *, epochs: int = 10,
                           batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 0.0,
                           seed: int = 0) -> LinearCombinationHead:
    """Fit a +LC head on frozen outputs (``outputs``: the model's output dict concatenated
    over a data set, ``targets``: the class labels) with Adam on shuffled mini-batches,
    starting from the +JP rule.  Pure: returns the head (eval mode); attach it with
    ``method.set_linear_combination(head)``.  Nothing else is trained or modified."""
    features = method.lc_features({k: v.detach() for k, v in outputs.items()}).detach()
    targets = targets.detach().to(features.device)
    head = method.new_linear_combination().to(features.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        head.train()
        for _ in range(epochs):
            order = torch.randperm(features.shape[0], generator=generator).to(features.device)
            for start in range(0, features.shape[0], batch_size):
                batch = order[start:start + batch_size]
                loss = F.cross_entropy(head(features[batch]), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return head.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- builder


def build_heads(info: BackboneInfo, method: str, head: str, stages: Sequence[str], widths: Sequence[int],
                num_outputs: Sequence[Optional[int]]) -> List[BranchSpec]:
    def make(tap: str, width: int, outputs: Optional[int]) -> nn.Module:
        if head == "authors":
            return AuthorsSSALHead(info.tap_channels(tap), pool_level(info.tap_stride(tap)), outputs)
        return SSALHead(info.tap_channels(tap), width, head_downsamples(info, tap), outputs)

    return [BranchSpec(f"{method}.{i}", tap, make(tap, width, outputs))
            for i, (tap, width, outputs) in enumerate(zip(stages, widths, num_outputs))]


@register_method("ssal")
def build_ssal(info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    check_options("ssal", options, ["groupings", "stages", "eta", "loss_weights", "widths", "head"])
    if "groupings" not in options:
        raise ValueError("ssal: option 'groupings' is required (one length-C integer sequence per branch; "
                         "see ssal_models.grouping)")
    head, stages, widths, groupings = parse_layout("ssal", info, options)
    for index, grouping in enumerate(groupings):
        if grouping.size != num_classes:
            raise ValueError(f"ssal: groupings[{index}] has {grouping.size} entries but num_classes = {num_classes}")
    eta = positive_float("ssal", "eta", options.get("eta", 1.0 if len(groupings) <= 2 else 0.3))
    loss_weights = float_list("ssal", "loss_weights", options.get("loss_weights", 1.0), len(groupings) + 1)
    branches = build_heads(info, "ssal", head, stages, widths, [int(g.max()) + 1 for g in groupings])
    method = SSALMethod(num_classes, [b.name for b in branches], groupings, eta, loss_weights)
    return MethodBuild(method, branches)
