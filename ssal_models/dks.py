"""DKS, Deeply-supervised Knowledge Synergy (METHODS.md §2), and DS, plain deep supervision
(the same branches, cross-entropy terms only).  DS lives here because it *is* DKS without the
synergy term; it is registered as its own method, ``ds``.

Branches (:class:`DKSBranch`)
-----------------------------
Each auxiliary classifier is built from the backbone's own block type (BasicBlock for
ResNet-18/34, Bottleneck for ResNet-50/152, exactly as torchvision builds its stages), with
its own copies of the later down-sampling stages, so that every path from the input to a
classifier is down-sampled 32x; then global average pooling and a linear layer to the C
classes.  Default stage copies (``planes``, output channels = planes x expansion):

* on ``layer2`` (C2): a layer3-style copy (planes 256, ``a`` blocks), then a layer4-style copy
  (planes 512, ``b`` blocks); ResNet-18 a=1 b=2, ResNet-34 and ResNet-50 a=3 b=2, ResNet-152
  a=18 b=2;
* on ``layer3`` (C3): a layer4-style copy at 2x width (planes 1024, ``c`` blocks); ResNet-18
  c=2, ResNet-34/50/152 c=3;
* on ``layer1`` (C4, for three auxiliary classifiers): planes 128 x 1 block, 256 x 1, 512 x 2
  for every arch (our *choice*: our reading of the C4 column of the DKS supplementary's
  Table 7).
Every copy starts with a stride-2 block (with the usual 1x1 stride-2 projection shortcut).

So ResNet-50's C3 ends in 4096 channels (Bottleneck 1x1 1024 / 3x3 1024 / 1x1 4096, x3) and
ResNet-18's in 1024.  These are the paper's heavy branches: on ResNet-50 they cost more than
the backbone itself (see ``bench/branch_overhead.py``); only the main classifier is needed at
test time.  A tap inside a stage (``layer2.1``) gets the copies of that stage's branch.

Options of ``build_model(arch, "dks" | "ds", C, ...)``
------------------------------------------------------
* ``stages``: taps of the auxiliary classifiers, in ``layer1``..``layer3`` (``layerN.i``
  allowed); default ``[layer2, layer3]`` (the paper's main ImageNet setting); the paper's
  three-classifier ablation is ``[layer1, layer2, layer3]``.  Branch ``i`` is ``dks.i``.
* ``blocks``: per branch, the block count of each stage copy (e.g. ``[[1, 2], [2]]``);
  default from the table above.
* ``width``: a multiplier on every copy's planes (default 1.0; e.g. 0.5 for the "narrow"
  variant of the paper's ablation), rounded, at least 8.  A backbone built with
  ``width_multiplier`` m gets copies m times as wide too (planes x ``width`` x m): the copies
  mirror the backbone's own later stages.
* ``ce_weights``: ``[w_main, w_0, ...]`` or one number; default 1.
* ``kl_weight`` (``dks`` only): weight of the synergy term; default 1.
* ``eps`` (``dks`` only): 0 (default) is the exact KL; ``1e-8`` is the DKS authors' form
  (their ``KL_divergence``): both distributions become ``(p + ε) / (1 + C·ε)`` before the log,
  which caps each per-sample KL at about ``log(1/ε)`` = 18.4 nats.

Loss: ``L = Σ_i w_i·CE(z_i, y) + kl_weight·Σ_{i≠j} KL(stopgrad(p_j) ‖ p_i)`` over all ordered
pairs of classifiers (main included), temperature 1, each KL a batch mean, everything from
float32 log-softmax (``exp`` only of log-probabilities, which are <= 0: no overflow under
fp16 autocast).  Parts: ``ce/main``, ``ce/dks.i``, ``kl`` (the unweighted pair sum).

Prediction rules: ``main``, each branch (``dks.i``), and ``ensemble`` (the mean of all
classifiers' probabilities, main included).

Speed on CPU: the branches' wide convolutions run on maps of a few positions (ResNet-18's C3 copy:
1024 channels at 4x4 for a 112 px input), where oneDNN's convolution kernels reach about half the
FLOP rate they reach on the backbone's maps.  The branches' convolutions are therefore
:class:`SmallMapConv2d`: on CPU, an output map of at most ``SMALL_MAP_POSITIONS`` positions is
computed as unfold + one matrix product (the same sum of products, so the same outputs and
gradients up to float rounding); larger maps and GPUs use the ordinary convolution.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import STAGES, BackboneInfo, Block, init_like_torchvision, make_stage
from .base import (BranchSpec, Method, MethodBuild, Outputs, check_options, cross_entropy, float_list,
                   log_probs, positive_float, register_method, stage_list)

# [[a, b], [c]]: stage-copy blocks of the branch on layer2 and of the branch on layer3
PAPER_BLOCKS = {
    "resnet18": [[1, 2], [2]],
    "resnet34": [[3, 2], [3]],
    "resnet50": [[3, 2], [3]],
    "resnet152": [[18, 2], [3]],
}
LAYER1_BLOCKS = [1, 1, 2]
# planes of the stage copies of a branch on layer1 / layer2 / layer3 (layer3's is 2x layer4's)
COPY_PLANES = {0: (128, 256, 512), 1: (256, 512), 2: (1024,)}
BRANCH_STAGES = ("layer1", "layer2", "layer3")
# output maps up to this many positions (4 x 4) go through the matrix product on CPU
SMALL_MAP_POSITIONS = 16


class SmallMapConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state-dict keys) that, on CPU, computes a small output map as
    unfold + one (N*positions) x (C*k*k) by (C*k*k) x O matrix product: for wide layers on maps of a
    few positions that runs at the backbone's FLOP rate, where the convolution kernel does not."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, _, h, w = input.shape
        kh, kw = self.kernel_size
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        plain = (input.device.type != "cpu" or self.groups != 1 or self.padding_mode != "zeros"
                 or isinstance(self.padding, str) or out_h * out_w > SMALL_MAP_POSITIONS)
        if plain:
            return super()._conv_forward(input, weight, bias)
        columns = F.unfold(input, self.kernel_size, self.dilation, self.padding, self.stride)  # N, C*k*k, L
        rows = columns.transpose(1, 2).reshape(n * out_h * out_w, -1)
        out = rows @ weight.reshape(weight.shape[0], -1).t()
        if bias is not None:
            out = out + bias
        out = out.reshape(n, out_h, out_w, -1).permute(0, 3, 1, 2)  # a channels-last layout already
        return out if input.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def small_map_convs(module: nn.Module) -> nn.Module:
    """Turn every plain Conv2d of ``module`` into a :class:`SmallMapConv2d` in place (parameters kept)."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
    return module


def default_blocks(arch: str, stage_index: int) -> List[int]:
    if stage_index == 0:
        return list(LAYER1_BLOCKS)
    return list(PAPER_BLOCKS[arch][stage_index - 1])


class DKSBranch(nn.Module):
    """Stage copies (each stride 2), global average pooling, a linear classifier."""

    def __init__(self, block: Block, in_channels: int, planes: Sequence[int], blocks: Sequence[int],
                 num_classes: int, zero_init_residual: bool = False):
        super().__init__()
        stages, inplanes = [], in_channels
        for stage_planes, stage_blocks in zip(planes, blocks):
            stages.append(make_stage(block, inplanes, stage_planes, stage_blocks, stride=2))
            inplanes = stage_planes * block.expansion
        self.stages = small_map_convs(nn.Sequential(*stages))
        self.fc = nn.Linear(inplanes, num_classes)
        init_like_torchvision(self.stages, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(x), 1), 1))


class DKSMethod(Method):
    """DKS (``kl_weight > 0``, name ``dks``) or DS (``kl_weight = 0``, name ``ds``)."""

    def __init__(self, name: str, num_classes: int, branch_names: Sequence[str], ce_weights: Sequence[float],
                 kl_weight: float, eps: float = 0.0):
        super().__init__(num_classes, branch_names)
        self.name = name
        self.ce_weights = [float(w) for w in ce_weights]
        self.kl_weight = float(kl_weight)
        self.eps = float(eps)

    @property
    def classifier_names(self) -> List[str]:
        return ["main"] + self.branch_names

    def loss(self, outputs: Outputs, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        total = outputs["main"].new_zeros((), dtype=torch.float32)
        parts: Dict[str, torch.Tensor] = {}
        for weight, name in zip(self.ce_weights, self.classifier_names):
            ce = cross_entropy(outputs[name], targets, self.label_smoothing)
            total = total + weight * ce
            parts[f"ce/{name}"] = ce.detach()
        if self.name == "dks":
            kl = synergy_kl([log_probs(outputs[name]) for name in self.classifier_names], self.eps)
            total = total + self.kl_weight * kl
            parts["kl"] = kl.detach()
        return total, parts

    def predict(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        rules = {name: log_probs(outputs[name]) for name in self.classifier_names}
        stacked = torch.stack(list(rules.values()))
        rules["ensemble"] = torch.logsumexp(stacked, dim=0) - math.log(stacked.shape[0])
        return rules

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ce_weights={self.ce_weights}, kl_weight={self.kl_weight}, eps={self.eps}"


def synergy_kl(log_probs_list: Sequence[torch.Tensor], eps: float = 0.0) -> torch.Tensor:
    """``Σ_{i≠j} KL(stopgrad(p_j) ‖ p_i)``, each term a batch mean, from log-probabilities:
    the teacher ``j`` is detached, so only the student ``i`` receives gradient.  ``eps > 0``:
    the DKS authors' smoothed form, ``p -> (p + ε) / (1 + C·ε)`` on both sides."""
    if eps > 0:
        num_classes = log_probs_list[0].shape[1]
        log_probs_list = [torch.log((lp.exp() + eps) / (1.0 + num_classes * eps)) for lp in log_probs_list]
    total = log_probs_list[0].new_zeros(())
    for j, teacher in enumerate(log_probs_list):
        teacher = teacher.detach()
        for i, student in enumerate(log_probs_list):
            if i != j:
                total = total + F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return total


def _blocks_option(method: str, value: Any, stage_indices: Sequence[int]) -> List[List[int]]:
    expected = [3 - s for s in stage_indices]  # number of later stages each branch copies
    ok = isinstance(value, (list, tuple)) and len(value) == len(expected) and all(
        isinstance(row, (list, tuple)) and len(row) == n
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in row)
        for row, n in zip(value, expected))
    if not ok:
        raise ValueError(f"{method}: option 'blocks' must give, per branch, one block count >= 1 per stage copy: "
                         f"lists of lengths {expected}, got {value!r}")
    return [list(row) for row in value]


def _build(method: str, info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    valid = ["stages", "blocks", "width", "ce_weights"] + (["kl_weight", "eps"] if method == "dks" else [])
    check_options(method, options, valid)
    stages = stage_list(method, info, options.get("stages", ["layer2", "layer3"]), BRANCH_STAGES)
    stage_indices = [STAGES.index(tap.split(".")[0]) for tap in stages]
    if "blocks" in options:
        blocks = _blocks_option(method, options["blocks"], stage_indices)
    else:
        blocks = [default_blocks(info.arch, s) for s in stage_indices]
    width = positive_float(method, "width", options.get("width", 1.0))
    ce_weights = float_list(method, "ce_weights", options.get("ce_weights", 1.0), len(stages) + 1)
    kl_weight = positive_float(method, "kl_weight", options.get("kl_weight", 1.0), allow_zero=True) \
        if method == "dks" else 0.0
    eps = positive_float(method, "eps", options.get("eps", 0.0), allow_zero=True) if method == "dks" else 0.0
    if eps >= 1e-2:
        raise ValueError(f"{method}: option 'eps' must be < 0.01 (the authors use 1e-8; 0 = exact), got {eps!r}")
    zero_init_residual = bool(options.get("zero_init_residual", False))
    branches = []
    for index, (tap, stage_index, branch_blocks) in enumerate(zip(stages, stage_indices, blocks)):
        # the copies of the later stages are as wide as the backbone's own (width_multiplier)
        planes = [max(8, round(p * width * info.width_multiplier)) for p in COPY_PLANES[stage_index]]
        module = DKSBranch(info.block, info.tap_channels(tap), planes, branch_blocks, num_classes, zero_init_residual)
        branches.append(BranchSpec(f"{method}.{index}", tap, module))
    return MethodBuild(DKSMethod(method, num_classes, [b.name for b in branches], ce_weights, kl_weight, eps),
                       branches)


@register_method("dks")
def build_dks(info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    return _build("dks", info, num_classes, options)


@register_method("ds")
def build_ds(info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    return _build("ds", info, num_classes, options)
