"""The SSAL authors' ImageNet branch heads (option ``head: authors`` of ``ssal`` and ``gapcat``).

Written layer for layer from ``InceptionAux`` in the authors' ``pytorch/aux_nets.py``
(Engler93/Self-Supervised-Autogenous-Learning): torchvision's Inception-v3 C / D / E blocks,
"smaller" (channel factor ``chf``), every conv a conv-BN(eps 1e-3)-ReLU without bias, PyTorch's
default init (the authors create the heads after torchvision's ResNet init loop, so it never
touches them).  Module names are the authors' (``cbr1``, ``inception1``, ``inception2``, ``fc``).

Per head, by the stride of the tap it reads (the authors' ``pool`` argument: 2 on ``layer1``,
1 on ``layer2``, 0 on ``layer3``; here 2 / 1 / 0 for a tap of stride 4 / 8 / >= 16, so every
arch and inner taps get the head of their resolution)::

    [pool 2]  3x3 conv stride 2 (no padding), C_in -> C_in
              InceptionC_smaller(C_in, chf 0.5)                          -> 256
    [pool>=1] InceptionD_smaller(256, 0.5) -> 256,  InceptionE_smaller(256, 1) -> 748,
              InceptionD_smaller(748, 0.5) -> 256,  InceptionE_smaller(256, 2) -> 1496
    [pool 0]  InceptionD_smaller(256, 0.5) -> 256,  InceptionE_smaller(256, 2) -> 1496
              global average pooling, Linear 1496 -> k

``C_in`` is the tap's channel count (ResNet-50: 256 / 512 / 1024; ResNet-18: 64 / 128 / 256);
the rest is fixed width, as in the authors' code.  At 224 px every head ends at 1496 x 6 x 6.
The D blocks down-sample by unpadded stride-2 convs, so the input must be at least 64 px
(``layer1``: 16 -> 7 -> 3 -> 1).  ResNet-50, 1000 classes, groups 200 / 334 / 500 after
layer1 / layer2 / layer3: 4.38 M / 4.06 M / 3.45 M parameters (46.5 % of the backbone).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2 * 748  # channels of the last InceptionE_smaller (chf 2)


class BasicConv2d(nn.Module):
    """conv (no bias) - BN (eps 1e-3) - ReLU, as torchvision's Inception and the authors."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(int(in_channels), int(out_channels), bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(int(out_channels), eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionCSmaller(nn.Module):
    """1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1, each ``chf * 128`` channels."""

    def __init__(self, in_channels: int, channels_7x7: int = 160, chf: float = 1.0):
        super().__init__()
        c7, out = int(chf * channels_7x7), int(chf * 128)
        self.branch1x1 = BasicConv2d(in_channels, out, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, out, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, out, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, out, kernel_size=1)
        self.out_channels = 4 * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b7, bd, pool], 1)


class InceptionDSmaller(nn.Module):
    """Down-sampling block (unpadded stride 2): 1x1-3x3 | 1x1-1x7-7x1-3x3 | maxpool-1x1."""

    def __init__(self, in_channels: int, chf: float = 1.0):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, int(chf * 192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(int(chf * 192), int(chf * 216), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, int(chf * 192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(int(chf * 192), int(chf * 192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(int(chf * 192), int(chf * 192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(int(chf * 192), int(chf * 168), kernel_size=3, stride=2)
        self.branch_pool = BasicConv2d(in_channels, int(chf * 128), kernel_size=1)
        self.out_channels = int(chf * 216) + int(chf * 168) + int(chf * 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        pool = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=2))
        return torch.cat([b3, b7, pool], 1)


class InceptionESmaller(nn.Module):
    """1x1 | 1x1-(1x3 || 3x1) | 1x1-3x3-(1x3 || 3x1) | avgpool-1x1."""

    def __init__(self, in_channels: int, chf: int = 1):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, chf * 128, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, chf * 128, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(chf * 128, chf * 128, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(chf * 128, chf * 128, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, chf * 160, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(chf * 160, chf * 128, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(chf * 128, chf * 128, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(chf * 128, chf * 128, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, chf * 108, kernel_size=1)
        self.out_channels = chf * (128 + 256 + 256 + 108)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, bd, pool], 1)


def pool_level(tap_stride: int) -> int:
    """The authors' ``pool`` for a tap of this stride: 2 at stride 4, 1 at 8, 0 from 16 on."""
    return 2 if tap_stride <= 4 else 1 if tap_stride <= 8 else 0


class AuthorsSSALHead(nn.Module):
    """``InceptionAux`` of the authors (see the module docstring).  With ``num_outputs=None`` it
    returns its pooled 1496 features instead of logits (GapCat)."""

    def __init__(self, in_channels: int, pool: int, num_outputs: Optional[int]):
        super().__init__()
        self.pool = int(pool)
        self.cbr1 = BasicConv2d(in_channels, in_channels, kernel_size=3, stride=2) if pool >= 2 else None
        self.inception1 = InceptionCSmaller(in_channels, chf=0.5)
        if pool >= 1:
            self.inception2 = nn.Sequential(InceptionDSmaller(256, chf=0.5), InceptionESmaller(256, chf=1),
                                            InceptionDSmaller(748, chf=0.5), InceptionESmaller(256, chf=2))
        else:
            self.inception2 = nn.Sequential(InceptionDSmaller(256, chf=0.5), InceptionESmaller(256, chf=2))
        self.feature_dim = FEATURE_DIM
        self.fc = nn.Linear(FEATURE_DIM, num_outputs) if num_outputs is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cbr1 is not None:
            x = self.cbr1(x)
        x = self.inception2(self.inception1(x))
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return features if self.fc is None else self.fc(features)
