"""Capacity baselines of the SSAL paper (Table 2, TinyImageNet): WideResnet18 (width 1.5),
DeepResnet18 (4 extra 256-filter convs before layer1), DWResnet18 (the same with 512 filters):
parameter counts, forward shapes with branches, option validation, the config keys."""
import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50

import ssal_models
from pipeline.train.config import ConfigError, load_config
from ssal_models.backbones import ScaledResNet, backbone_info
from ssal_models.grouping import random_grouping

# (options, parameters in the paper's Table 2, 200 classes)
PAPER = {
    "wide": ({"width_multiplier": 1.5}, 25.3e6),
    "deep": ({"stem_convs": 4, "stem_conv_width": 256}, 13.3e6),
    "deep_wide": ({"stem_convs": 4, "stem_conv_width": 512}, 19.0e6),
}


def groupings(num_classes, ks):
    return [random_grouping(num_classes, k, i) for i, k in enumerate(ks)]


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_parameter_counts_match_the_paper(variant):
    options, paper = PAPER[variant]
    with torch.device("meta"):
        model = ssal_models.build_model("resnet18", "baseline", 200, **options)
        plain = ssal_models.build_model("resnet18", "baseline", 200)
    total = ssal_models.count_parameters(model)["total"]
    assert abs(total - paper) <= 0.1e6, f"{variant}: {total / 1e6:.3f}M vs the paper's {paper / 1e6}M"
    assert abs(ssal_models.count_parameters(plain)["total"] - 11.2e6) <= 0.1e6
    assert all(p.device.type == "meta" for p in model.parameters())


def test_deeper_stem_layout():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet18", "baseline", 200, stem_convs=4, stem_conv_width=256)
    bb = model.backbone
    convs = [m for m in bb.stem_convs.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(64, 256, (3, 3), (1, 1))] + [(256, 256, (3, 3), (1, 1))] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bb.stem_convs.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in bb.stem_convs.modules()) == 4
    # layer1's first block reads the 256 channels through a 1x1 projection shortcut
    assert bb.layer1[0].conv1.in_channels == 256 and bb.layer1[0].downsample is not None
    assert bb.fc.in_features == 512


def test_wide_scales_every_conv():
    with torch.device("meta"):
        wide = ssal_models.build_model("resnet50", "baseline", 10, width_multiplier=1.5)
        plain = ssal_models.build_model("resnet50", "baseline", 10)
    wide_convs = [m for m in wide.modules() if isinstance(m, nn.Conv2d)]
    plain_convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(wide_convs) == len(plain_convs)
    for w, p in zip(wide_convs, plain_convs):
        assert w.out_channels == p.out_channels * 3 // 2
        assert w.in_channels == (3 if p.in_channels == 3 else p.in_channels * 3 // 2)
    assert wide.backbone.fc.in_features == 3072


@pytest.mark.parametrize("arch, constructor", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_default_options_are_torchvision_value_for_value(arch, constructor):
    # ScaledResNet mirrors torchvision's construction and init order: with default capacity it
    # is torchvision's ResNet, parameter for parameter (so its init follows torchvision's)
    torch.manual_seed(0)
    reference = constructor(weights=None, num_classes=10, zero_init_residual=True)
    torch.manual_seed(0)
    scaled = ScaledResNet(backbone_info(arch), 10, zero_init_residual=True)
    ref_state, state = reference.state_dict(), scaled.state_dict()
    assert list(ref_state) == list(state)
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reference.eval()(x), scaled.eval()(x))
    # and build_model with default options still builds torchvision's own class
    assert type(ssal_models.build_model(arch, "baseline", 10).backbone) is type(reference)


def test_new_layers_initialised_like_torchvision():
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet18", "baseline", 10, stem_convs=2, stem_conv_width=32,
                                    zero_init_residual=True)
    conv, bn = model.backbone.stem_convs[1][0], model.backbone.stem_convs[1][1]
    std = (2.0 / (conv.out_channels * 9)) ** 0.5  # kaiming normal, fan_out, relu
    assert abs(conv.weight.std().item() - std) < 0.15 * std
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert all(not b.bn2.weight.detach().any() for b in model.backbone.layer1)


FORWARD_CASES = [
    ("ssal", {"width_multiplier": 1.5, "groupings": groupings(10, (2, 3, 5))}, {"ssal.0": 2, "ssal.1": 3, "ssal.2": 5}),
    ("dks", {"width_multiplier": 1.5}, {"dks.0": 10, "dks.1": 10}),
    ("gapcat", {"width_multiplier": 1.5, "groupings": groupings(10, (2, 3, 5))}, {}),
    ("ds", {"stem_convs": 2, "stem_conv_width": 24, "stages": ["layer1", "layer2.0"]}, {"ds.0": 10, "ds.1": 10}),
    ("ssal", {"stem_convs": 2, "stem_conv_width": 24, "groupings": groupings(10, (2, 3, 5))},
     {"ssal.0": 2, "ssal.1": 3, "ssal.2": 5}),
    ("baseline", {"width_multiplier": 0.75, "stem_convs": 1, "blurpool": True}, {}),
]


@pytest.mark.parametrize("method, options, branch_widths", FORWARD_CASES, ids=lambda v: str(v)[:40])
def test_forward_shapes_with_branches(method, options, branch_widths):
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet18", method, 10, **options)
    out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == ["main", *branch_widths]
    for name, logits in out.items():
        assert logits.shape == (2, branch_widths.get(name, 10)), name
        assert torch.isfinite(logits).all()


def test_branches_see_the_scaled_channels():
    with torch.device("meta"):
        ssal = ssal_models.build_model("resnet18", "ssal", 10, width_multiplier=1.5, groupings=groupings(10, (2, 3, 5)))
        gapcat = ssal_models.build_model("resnet50", "gapcat", 10, width_multiplier=1.5, groupings=groupings(10, (2, 3, 5)))
        dks = ssal_models.build_model("resnet50", "dks", 10, width_multiplier=1.5)
        maxl = ssal_models.build_model("resnet18", "maxl", 10, width_multiplier=1.5, psi=2)
    # SSAL heads read 96 / 192 / 384 channels with default widths = the scaled planes
    assert [b.reduce[0].in_channels for b in ssal.branches] == [96, 192, 384]
    assert [b.feature_dim for b in ssal.branches] == [192, 384, 768]
    # GapCat on ResNet-50: taps of 384 / 768 / 1536 channels, main fc on 3072 + 2 x (96+192+384)
    assert [b.reduce[0].in_channels for b in gapcat.branches] == [384, 768, 1536]
    assert gapcat.backbone.fc.in_features == 3072 + 2 * (96 + 192 + 384)
    # DKS copies are as wide as the backbone's later stages: C2 on layer2 (768 ch) -> ... -> 3072
    c2, c3 = dks.branches
    assert c2.stages[0][0].conv1.in_channels == 768 and c2.fc.in_features == 3072
    assert c3.stages[0][0].conv1.in_channels == 1536 and c3.fc.in_features == 6144
    # MAXL's auxiliary head reads the widened pooled features
    (aux,) = maxl.branches
    assert aux.fc.in_features == 768


@pytest.mark.parametrize("options, match", [
    ({"width_multiplier": 0}, "'width_multiplier' must be a finite number > 0"),
    ({"width_multiplier": -1.5}, "'width_multiplier' must be a finite number > 0"),
    ({"width_multiplier": float("inf")}, "'width_multiplier' must be a finite number > 0"),
    ({"width_multiplier": True}, "'width_multiplier' must be a finite number > 0"),
    ({"width_multiplier": "1.5"}, "'width_multiplier' must be a finite number > 0"),
    ({"width_multiplier": 0.001}, "'width_multiplier' is too small"),
    ({"stem_convs": -1}, "'stem_convs' must be an integer >= 0"),
    ({"stem_convs": 1.0}, "'stem_convs' must be an integer >= 0"),
    ({"stem_convs": True}, "'stem_convs' must be an integer >= 0"),
    ({"stem_convs": 2, "stem_conv_width": 0}, "'stem_conv_width' must be an integer >= 1"),
    ({"stem_conv_width": 25.6}, "'stem_conv_width' must be an integer >= 1"),
])
@pytest.mark.parametrize("method", ["baseline", "dks"])
def test_bad_capacity_options_raise(options, match, method):
    with pytest.raises(ValueError, match=match) as info:
        with torch.device("meta"):
            ssal_models.build_model("resnet18", method, 10, **options)
    assert "\n" not in str(info.value)


def test_config_keys_reach_the_model():
    from pipeline.train.factory import build_model

    cfg = load_config(None, ["method.name=baseline", "model.width_multiplier=1.5", "model.stem_convs=1",
                             "model.stem_conv_width=32"])
    assert (cfg.model.width_multiplier, cfg.model.stem_convs, cfg.model.stem_conv_width) == (1.5, 1, 32)
    with torch.device("meta"):
        model = build_model(cfg, 10, None)
    assert model.backbone.conv1.out_channels == 96 and model.backbone.stem_convs[0][0].out_channels == 32
    assert model.backbone.fc.in_features == 768
    defaults = load_config(None)
    assert (defaults.model.width_multiplier, defaults.model.stem_convs, defaults.model.stem_conv_width) == (1.0, 0, 256)


def test_arch_tag_names_the_capacity_options():
    from pipeline.train.factory import arch_label

    assert arch_label(load_config(None, ["model.arch=resnet34"]).model) == "resnet34"
    assert arch_label(load_config(None, ["model.width_multiplier=1.5"]).model) == "resnet18-w1.5"
    assert arch_label(load_config(None, ["model.stem_convs=4", "model.stem_conv_width=512"]).model) == "resnet18-stem4x512"


@pytest.mark.parametrize("override, message", [
    ("model.width_multiplier=0", "model.width_multiplier: must be a finite number > 0"),
    ("model.width_multiplier=-2", "model.width_multiplier: must be a finite number > 0"),
    ("model.width_multiplier=.inf", "model.width_multiplier: must be a finite number > 0"),
    ("model.width_multiplier=0.001", "model.width_multiplier: 0.001 leaves the stem with 0 channels"),
    ("model.width_multiplier=wide", "model.width_multiplier: expected a number"),
    ("model.stem_convs=-1", "model.stem_convs: must be >= 0"),
    ("model.stem_convs=1.5", "model.stem_convs: expected an integer"),
    ("model.stem_conv_width=0", "model.stem_conv_width: must be >= 1"),
])
def test_config_refuses_bad_capacity_values(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
