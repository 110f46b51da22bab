"""ResNet backbones (torchvision definitions, random init) and the pieces branches build on.

* :data:`ARCHS` / :func:`build_backbone`: ``resnet18``, ``resnet34``, ``resnet50``,
  ``resnet152`` from :mod:`torchvision.models` with ``weights=None`` (never a download).
* Tap points (where a branch attaches): ``"layer1"`` .. ``"layer4"`` (a stage's output) or
  ``"layerN.i"`` (the output of block ``i`` of stage ``N``, 0-based), resolved by
  :meth:`BackboneInfo.parse_tap`.  Every block of a stage works at the stage's resolution
  (torchvision down-samples in the first block), so a tap inside a stage has the stage's
  channels and stride.
* :func:`apply_blurpool`: FFCV's recipe, a depthwise ``[1,2,1]x[1,2,1]/16`` blur before every
  strided conv with at least 16 input channels (so not the RGB stem conv).
* :func:`make_stage` / :func:`init_like_torchvision`: a ResNet stage of the backbone's own block
  type, initialised exactly as torchvision initialises its ResNets (DKS branches use these).
* Capacity options (the SSAL paper's WideResnet18 / DeepResnet18 / DWResnet18 baselines, Table 2):
  ``width_multiplier`` m scales the stem and every stage's planes (``planes * m`` rounded
  half up; the main classifier reads ``round(512 * m) * expansion`` features); ``stem_convs``
  extra 3x3 conv-BN-ReLU layers of ``stem_conv_width`` filters (absolute, not scaled by the
  multiplier; stride 1) between the stem's max-pool and ``layer1``, whose first block then
  gets the usual 1x1 projection shortcut.  Branch builders read the resulting channel
  counts from :class:`BackboneInfo` (:meth:`~BackboneInfo.stage_planes`,
  :meth:`~BackboneInfo.stage_channels`, :meth:`~BackboneInfo.tap_channels`,
  :attr:`~BackboneInfo.feature_dim`), never from :data:`STAGE_PLANES`, which holds
  torchvision's unscaled planes.  ResNet-18 with 200 classes: 11.3 M parameters; width 1.5:
  25.3 M; 4 stem convs of 256: 13.3 M; of 512: 19.0 M (the paper: 11.2 / 25.3 / 13.3 / 19.0 M).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

Block = Type[Union[BasicBlock, Bottleneck]]

STAGES: Tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
# base widths ("planes") of torchvision's four stages; output channels = planes * block.expansion.
# Unscaled: a backbone with a width multiplier has BackboneInfo.stage_planes(i) instead.
STAGE_PLANES: Tuple[int, ...] = (64, 128, 256, 512)
# output channels of torchvision's stem conv (= inplanes of layer1), unscaled
STEM_PLANES: int = 64
# total down-sampling of the input at each stage's output (stem: conv s2 + maxpool s2)
STAGE_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)

ARCHS: dict[str, tuple[Callable[..., tv_resnet.ResNet], Block, Tuple[int, int, int, int]]] = {
    "resnet18": (tv_resnet.resnet18, BasicBlock, (2, 2, 2, 2)),
    "resnet34": (tv_resnet.resnet34, BasicBlock, (3, 4, 6, 3)),
    "resnet50": (tv_resnet.resnet50, Bottleneck, (3, 4, 6, 3)),
    "resnet152": (tv_resnet.resnet152, Bottleneck, (3, 8, 36, 3)),
}

_TAP_RE = re.compile(r"^(layer[1-4])(?:\.(\d+))?$")


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about an arch that branch builders need (no module is built)."""

    arch: str
    block: Block
    layers: Tuple[int, int, int, int]
    width_multiplier: float = 1.0
    stem_convs: int = 0
    stem_conv_width: int = 256

    @property
    def is_torchvision(self) -> bool:
        """Default capacity: the backbone is torchvision's own ResNet, module for module."""
        return self.width_multiplier == 1.0 and self.stem_convs == 0

    def scaled(self, planes: int) -> int:
        """``planes`` times the width multiplier, rounded to an integer (at least 1)."""
        return max(1, int(math.floor(planes * self.width_multiplier + 0.5)))

    @property
    def stem_planes(self) -> int:
        """Output channels of the stem conv (the ``conv1`` 7x7)."""
        return self.scaled(STEM_PLANES)

    @property
    def layer1_inplanes(self) -> int:
        """Input channels of ``layer1``: the stem's, or the last extra stem conv's."""
        return self.stem_conv_width if self.stem_convs else self.stem_planes

    def stage_planes(self, stage_index: int) -> int:
        """Planes of stage ``stage_index`` (0..3) with the width multiplier applied."""
        return self.scaled(STAGE_PLANES[stage_index])

    def stage_channels(self, stage_index: int) -> int:
        """Output channels of stage ``stage_index`` (planes x block expansion)."""
        return self.stage_planes(stage_index) * self.block.expansion

    @property
    def feature_dim(self) -> int:
        """Channels of the main pooled features (input width of the main classifier)."""
        return self.stage_channels(len(STAGES) - 1)

    def valid_taps(self) -> list[str]:
        taps = []
        for stage, blocks in zip(STAGES, self.layers):
            taps.append(stage)
            taps.extend(f"{stage}.{i}" for i in range(blocks))
        return taps

    def parse_tap(self, tap: str) -> Tuple[int, Optional[int]]:
        """``"layer3"`` -> ``(2, None)``; ``"layer3.1"`` -> ``(2, 1)``; the last block of a
        stage is the stage's output, so ``"layer3.5"`` on ResNet-50 -> ``(2, None)``.
        Raises ValueError naming the valid taps."""
        match = _TAP_RE.match(tap) if isinstance(tap, str) else None
        if match is not None:
            stage_index = STAGES.index(match.group(1))
            if match.group(2) is None:
                return stage_index, None
            block_index = int(match.group(2))
            if block_index < self.layers[stage_index]:
                return stage_index, (None if block_index == self.layers[stage_index] - 1 else block_index)
        raise ValueError(
            f"bad stage {tap!r} for {self.arch}: use layer1..layer4 or layerN.i with i < blocks of "
            f"that stage ({', '.join(f'{s}: {n} blocks' for s, n in zip(STAGES, self.layers))})")

    def canonical_tap(self, tap: str) -> str:
        stage_index, block_index = self.parse_tap(tap)
        return STAGES[stage_index] if block_index is None else f"{STAGES[stage_index]}.{block_index}"

    def tap_channels(self, tap: str) -> int:
        return self.stage_channels(self.parse_tap(tap)[0])

    def tap_stride(self, tap: str) -> int:
        return STAGE_STRIDES[self.parse_tap(tap)[0]]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def backbone_info(arch: str, width_multiplier: float = 1.0, stem_convs: int = 0,
                  stem_conv_width: int = 256) -> BackboneInfo:
    """The :class:`BackboneInfo` of ``arch`` with the capacity options, validated
    (``ValueError`` with a one-line message naming the option)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real) \
            or not math.isfinite(width_multiplier) or width_multiplier <= 0:
        raise ValueError(f"option 'width_multiplier' must be a finite number > 0, got {width_multiplier!r}")
    if math.floor(STEM_PLANES * width_multiplier + 0.5) < 1:
        raise ValueError(f"option 'width_multiplier' is too small: {width_multiplier!r} leaves the stem "
                         f"with 0 channels (use >= {1.0 / (2 * STEM_PLANES)})")
    if not _is_int(stem_convs) or stem_convs < 0:
        raise ValueError(f"option 'stem_convs' must be an integer >= 0, got {stem_convs!r}")
    if not _is_int(stem_conv_width) or stem_conv_width < 1:
        raise ValueError(f"option 'stem_conv_width' must be an integer >= 1, got {stem_conv_width!r}")
    _, block, layers = ARCHS[arch]
    return BackboneInfo(arch, block, layers, float(width_multiplier), int(stem_convs), int(stem_conv_width))


class ScaledResNet(tv_resnet.ResNet):
    """torchvision's ResNet with the capacity options of :class:`BackboneInfo`: every plane
    count scaled by ``width_multiplier``, and ``stem_convs`` extra conv-BN-ReLU layers
    (``self.stem_convs``, 3x3, stride 1) between the max-pool and ``layer1``.  Modules are
    created in torchvision's order and initialised as torchvision does (with default options
    it is torchvision's ResNet, parameter for parameter and, under one seed, value for value);
    the module names are torchvision's, plus ``stem_convs``."""

    def __init__(self, info: BackboneInfo, num_classes: int, zero_init_residual: bool = False):
        nn.Module.__init__(self)  # not ResNet.__init__: it hard-codes the widths
        block = info.block
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, info.stem_planes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(info.stem_planes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        extra, channels = [], info.stem_planes
        for _ in range(info.stem_convs):
            extra.append(nn.Sequential(
                nn.Conv2d(channels, info.stem_conv_width, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(info.stem_conv_width),
                nn.ReLU(inplace=True)))
            channels = info.stem_conv_width
        self.stem_convs = nn.Sequential(*extra)
        inplanes = info.layer1_inplanes
        for index, (name, blocks) in enumerate(zip(STAGES, info.layers)):
            planes = info.stage_planes(index)
            setattr(self, name, make_stage(block, inplanes, planes, blocks, stride=1 if index == 0 else 2))
            inplanes = planes * block.expansion
        self.inplanes = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(info.feature_dim, num_classes)
        init_like_torchvision(self, zero_init_residual)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(backbone_stem(self, x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_backbone(arch: Union[str, BackboneInfo], num_classes: int,
                   zero_init_residual: bool = False) -> tv_resnet.ResNet:
    """The ResNet with random init; its ``fc`` is the main classifier.  ``arch`` a name (or an
    info with default capacity): torchvision's own constructor; an info with a width multiplier
    or extra stem convs: a :class:`ScaledResNet`."""
    info = backbone_info(arch) if isinstance(arch, str) else arch
    if info.is_torchvision:
        constructor, _, _ = ARCHS[info.arch]
        return constructor(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    return ScaledResNet(info, num_classes, zero_init_residual)


def backbone_stem(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's input to ``layer1``: conv1, BN, ReLU, max-pool (+ the extra stem convs)."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    extra = getattr(backbone, "stem_convs", None)
    return x if extra is None else extra(x)


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage exactly as ``torchvision.models.ResNet._make_layer`` builds it."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            tv_resnet.conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_like_torchvision(module: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init: kaiming-normal (fan_out) convs, BN weight 1 / bias 0, and
    optionally the last BN of every residual block at 0 (each block starts as the identity).
    Linear layers keep PyTorch's default init, as torchvision's ``fc`` does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class BlurPoolConv2d(nn.Module):
    """A strided conv preceded by a fixed depthwise [1,2,1]x[1,2,1]/16 blur (anti-aliasing,
    Zhang 2019), as in FFCV's ImageNet recipe.  The wrapped conv keeps its name ``conv``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        kernel_1d = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel_1d[:, None] * kernel_1d[None, :]) / 16.0
        # persistent: a model built on the meta device gets the filter back from a checkpoint
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), stride=1, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(module: nn.Module) -> int:
    """Wrap every strided conv with >= 16 input channels in :class:`BlurPoolConv2d` (in place,
    recursively); returns how many were wrapped."""
    wrapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
            wrapped += 1
        elif not isinstance(child, BlurPoolConv2d):
            wrapped += apply_blurpool(child)
    return wrapped
