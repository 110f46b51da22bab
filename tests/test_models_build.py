"""build_model: output keys and shapes for every arch x method, options, validation, meta builds,
parameter counts."""
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import ssal_models
from ssal_models.grouping import random_grouping

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet152"]
METHODS = ["baseline", "ssal", "gapcat", "dks", "ds"]
FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet152": 2048}


def groupings_for(num_classes, ks=(2, 3, 5), seed=0):
    return [random_grouping(num_classes, k, seed + i) for i, k in enumerate(ks)]


def options_for(method, num_classes):
    return {"groupings": groupings_for(num_classes)} if method in ("ssal", "gapcat") else {}


def expected_keys(method):
    return {"baseline": ["main"], "gapcat": ["main"], "ssal": ["main", "ssal.0", "ssal.1", "ssal.2"],
            "dks": ["main", "dks.0", "dks.1"], "ds": ["main", "ds.0", "ds.1"]}[method]


def test_registry():
    assert ssal_models.available_archs() == ARCHS
    # maxl (ssal_models/maxl.py, a separate issue) registers itself when present
    assert set(ssal_models.available_methods()) - {"maxl"} == set(METHODS)
    assert ssal_models.available_methods() == sorted(ssal_models.available_methods())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_output_keys_and_shapes_on_meta(arch, method):
    # the engine validates configs by building on the meta device; shapes propagate there too
    with torch.device("meta"):
        model = ssal_models.build_model(arch, method, 10, **options_for(method, 10))
        out = model(torch.empty(2, 3, 64, 64))
    assert list(out) == expected_keys(method)
    widths = {"main": 10, "ssal.0": 2, "ssal.1": 3, "ssal.2": 5}
    for name, logits in out.items():
        assert logits.shape == (2, widths.get(name, 10)), name
    assert model.method.name == method
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_real_forward_resnet18(method):
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet18", method, 10, **options_for(method, 10))
    out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == expected_keys(method)
    assert all(torch.isfinite(v).all() for v in out.values())
    # the method object is a submodule with no parameters of its own
    assert any(m is model.method for m in model.modules())
    assert sum(p.numel() for p in model.method.parameters()) == 0


def test_method_buffers_move_with_the_model():
    model = ssal_models.build_model("resnet18", "ssal", 10, groupings=groupings_for(10))
    buffers = dict(model.method.named_buffers())
    assert sorted(buffers) == ["class_to_group_0", "class_to_group_1", "class_to_group_2"]
    model = model.to(torch.float64)  # .to() reaches them (dtype of integer buffers is kept)
    assert model.method.class_to_group_0.dtype == torch.long
    assert "method.class_to_group_2" in model.state_dict()


def test_inner_tap_reads_the_named_block():
    model = ssal_models.build_model("resnet18", "ssal", 10, groupings=groupings_for(10, ks=(2,)), stages=["layer2.0"])
    seen = {}
    model.backbone.layer2[0].register_forward_hook(lambda m, i, o: seen.__setitem__("block", o))
    model.branches[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("branch", i[0]))
    model(torch.randn(2, 3, 32, 32))
    assert seen["branch"] is seen["block"]
    assert model.branch_taps == ["layer2.0"]
    # the last block of a stage is the stage itself
    model = ssal_models.build_model("resnet18", "ssal", 10, groupings=groupings_for(10, ks=(2,)), stages=["layer2.1"])
    assert model.branch_taps == ["layer2"]


def test_ssal_defaults_follow_the_paper():
    model = ssal_models.build_model("resnet50", "ssal", 10, groupings=groupings_for(10))
    assert model.branch_taps == ["layer1", "layer2", "layer3"] and model.method.eta == 0.3
    model = ssal_models.build_model("resnet50", "ssal", 10, groupings=groupings_for(10, ks=(2,)))
    assert model.branch_taps == ["layer3"] and model.method.eta == 1.0
    model = ssal_models.build_model("resnet50", "ssal", 10, groupings=groupings_for(10, ks=(2, 3)), eta=0.5,
                                    loss_weights=[1.0, 0.4, 0.6], widths=[8, 16])
    assert model.branch_taps == ["layer2", "layer3"] and model.method.eta == 0.5
    assert model.method.loss_weights == [1.0, 0.4, 0.6]
    assert [b.feature_dim for b in model.branches] == [16, 32]


def test_dks_default_branches_match_the_table():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "dks", 1000)
    c2, c3 = model.branches
    assert model.branch_taps == ["layer2", "layer3"]
    assert [len(stage) for stage in c2.stages] == [3, 2] and [len(stage) for stage in c3.stages] == [3]
    assert all(isinstance(b, Bottleneck) for b in c3.stages.modules() if isinstance(b, (BasicBlock, Bottleneck)))
    assert c3.fc.in_features == 4096 and c2.fc.in_features == 2048
    with torch.device("meta"):
        model = ssal_models.build_model("resnet152", "ds", 1000, stages=["layer1", "layer2", "layer3"])
    assert [[len(s) for s in b.stages] for b in model.branches] == [[1, 1, 2], [18, 2], [3]]
    with torch.device("meta"):
        model = ssal_models.build_model("resnet18", "dks", 10, blocks=[[1, 1]], stages=["layer2"], width=0.5)
    (branch,) = model.branches
    assert [len(s) for s in branch.stages] == [1, 1] and branch.fc.in_features == 256


def bottleneck_params(inplanes, planes, downsample):
    out = planes * 4
    convs = inplanes * planes + 9 * planes * planes + planes * out
    bns = 2 * (planes + planes + out)
    return convs + bns + (inplanes * out + 2 * out if downsample else 0)


def params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_per_branch():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "dks", 1000)
    counts = ssal_models.count_parameters(model)
    backbone = model.backbone
    assert list(counts) == ["backbone", "dks.0", "dks.1", "total"]
    assert counts["backbone"] == 25_557_032  # torchvision's ResNet-50
    # C2: the same layer3 as the backbone's with 3 of its 6 blocks, layer4 with 2 of 3, an fc
    assert counts["dks.0"] == params(backbone.layer3[:3]) + params(backbone.layer4[:2]) + params(backbone.fc)
    # C3: a 2x-wide layer4 (planes 1024) of 3 bottlenecks on 1024 channels, then fc 4096 -> 1000
    expected_c3 = bottleneck_params(1024, 1024, True) + 2 * bottleneck_params(4096, 1024, False) + 4096 * 1000 + 1000
    assert counts["dks.1"] == expected_c3
    assert counts["total"] == counts["backbone"] + counts["dks.0"] + counts["dks.1"]


def test_ssal_branches_cost_far_less_than_the_backbone():
    groupings = [random_grouping(1000, k, i) for i, k in enumerate((200, 334, 500))]
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "ssal", 1000, groupings=groupings)
    counts = ssal_models.count_parameters(model)
    branches = counts["ssal.0"] + counts["ssal.1"] + counts["ssal.2"]
    assert counts["backbone"] == 25_557_032
    assert branches < 0.15 * counts["backbone"]
    assert counts["total"] == counts["backbone"] + branches
    # the group classifier of each head has k outputs
    assert [b.classifier.out_features for b in model.branches] == [200, 334, 500]


def test_gapcat_widens_the_main_classifier():
    model = ssal_models.build_model("resnet18", "gapcat", 10, groupings=groupings_for(10))
    counts = ssal_models.count_parameters(model)
    assert list(counts) == ["backbone", "gapcat.0", "gapcat.1", "gapcat.2", "total"]
    assert model.backbone.fc.in_features == 512 + 2 * (64 + 128 + 256)
    # the same branch layout as SSAL: equal conv parameters, minus the group classifiers
    ssal = ssal_models.build_model("resnet18", "ssal", 10, groupings=groupings_for(10))
    for gap_branch, ssal_branch in zip(model.branches, ssal.branches):
        assert params(gap_branch) == params(ssal_branch) - params(ssal_branch.classifier)
    # CE on the main head only, and the branches get gradient through it
    out = model(torch.randn(2, 3, 32, 32))
    loss, parts = model.method.loss(out, torch.tensor([1, 2]))
    assert list(parts) == ["ce/main"]
    loss.backward()
    assert model.branches[0].reduce[0].weight.grad.abs().sum() > 0


def test_zero_init_residual_reaches_dks_branches():
    model = ssal_models.build_model("resnet18", "dks", 10, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 + 3 + 2
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    model = ssal_models.build_model("resnet50", "dks", 10, zero_init_residual=False)
    assert all(torch.all(b.bn3.weight == 1) for b in model.modules() if isinstance(b, Bottleneck))


@pytest.mark.parametrize("arch,expected", [("resnet18", 6), ("resnet50", 6)])
def test_blurpool_wraps_every_strided_conv(arch, expected):
    from ssal_models.backbones import BlurPoolConv2d

    model = ssal_models.build_model(arch, "baseline", 10, blurpool=True)
    wrapped = [m for m in model.modules() if isinstance(m, BlurPoolConv2d)]
    assert len(wrapped) == expected  # layer2..4: the strided conv and the strided 1x1 shortcut
    assert isinstance(model.backbone.conv1, nn.Conv2d)  # RGB stem conv (3 channels) untouched
    assert all(max(m.conv.stride) == 2 for m in wrapped)
    assert torch.allclose(wrapped[0].blur_filter.sum(dim=(1, 2, 3)), torch.ones(wrapped[0].conv.in_channels))
    unstrided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert all(any(w.conv is m for w in wrapped) for m in unstrided if m.in_channels >= 16)
    # branches are wrapped too (SSAL heads: 2 + 1 + 1 strided convs)
    ssal = ssal_models.build_model(arch, "ssal", 10, groupings=groupings_for(10), blurpool=True)
    assert sum(isinstance(m, BlurPoolConv2d) for m in ssal.branches.modules()) == 4
    assert ssal(torch.randn(2, 3, 32, 32))["ssal.0"].shape == (2, 2)


def test_blur_of_a_constant_interior_is_the_identity():
    from ssal_models.backbones import BlurPoolConv2d

    conv = nn.Conv2d(16, 4, 3, stride=2, padding=1, bias=False)
    blurred = BlurPoolConv2d(conv)
    x = torch.zeros(1, 16, 12, 12)
    x[..., 4:8, 4:8] = 1.0
    expected = torch.nn.functional.conv2d(
        x, torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])).div(16).expand(16, 1, 3, 3),
        padding=1, groups=16)
    assert torch.allclose(blurred(x), conv(expected))
    assert not torch.allclose(blurred(x), conv(x))


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("args,options,match", [
    (("resnet101", "baseline", 10), {}, r"unknown arch 'resnet101'; valid archs: resnet18, resnet34"),
    (("resnet18", "dkss", 10), {}, r"unknown method 'dkss'; valid methods: baseline, dks, ds, gapcat"),
    (("resnet18", "baseline", 1), {}, "num_classes"),
    (("resnet18", "baseline", 10), {"eta": 0.3}, r"unknown option 'eta' for method 'baseline'; valid options: blurpool"),
    (("resnet18", "dks", 10), {"groupings": []}, r"unknown option 'groupings' for method 'dks'; valid options: .*kl_weight"),
    (("resnet18", "ds", 10), {"kl_weight": 1.0}, r"unknown option 'kl_weight' for method 'ds'"),
    (("resnet18", "baseline", 10), {"blurpool": "yes"}, "'blurpool' must be true or false"),
    (("resnet18", "ssal", 10), {}, "'groupings' is required"),
    (("resnet18", "ssal", 10), {"groupings": [0, 1] * 5}, "list of groupings"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 4]}, r"groupings\[0\] has 8 entries but num_classes = 10"),
    (("resnet18", "ssal", 10), {"groupings": [[0] * 10]}, r"groupings\[0\] must use group indices"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "eta": 0}, "'eta' must be a finite number > 0"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "loss_weights": [1, 1, 1]}, "'loss_weights' must be 2"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "stages": ["layer5"]}, r"bad stage 'layer5'.*layer1: 2 blocks"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "stages": ["layer3.2"]}, "bad stage 'layer3.2'"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "stages": ["layer2", "layer3"]}, "1 groupings but 2 stages"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "widths": [0]}, "'widths' must be 1 integers >= 2"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5] * 4}, "4 branches have no default stages"),
    (("resnet18", "dks", 10), {"stages": ["layer4"]}, r"stage 'layer4' is not allowed; branches attach in layer1, layer2, layer3"),
    (("resnet18", "dks", 10), {"stages": "layer2"}, "'stages' must be a non-empty list"),
    (("resnet18", "dks", 10), {"blocks": [[1], [2]]}, r"'blocks' must give.*lengths \[2, 1\]"),
    (("resnet18", "dks", 10), {"kl_weight": -1}, "'kl_weight' must be a finite number >= 0"),
    (("resnet18", "dks", 10), {"kl_weight": "1"}, "'kl_weight' must be a finite number >= 0"),
    (("resnet18", "ssal", 10), {"groupings": [[0, 1] * 5], "loss_weights": "11"}, "'loss_weights' must be a number"),
    (("resnet18", "baseline", 2.0), {}, "num_classes must be an integer"),
    (("resnet18", "dks", 10), {"ce_weights": "one"}, "'ce_weights' must be a number or a list of 3 numbers"),
    (("resnet18", "dks", 10), {"width": 0}, "'width' must be a finite number > 0"),
])
def test_bad_arguments_raise_one_line_value_errors(args, options, match):
    with pytest.raises(ValueError, match=match) as info:
        with torch.device("meta"):
            ssal_models.build_model(*args, **options)
    assert "\n" not in str(info.value)


def test_gapcat_accepts_ssal_options_layout():
    model = ssal_models.build_model("resnet18", "gapcat", 10, groupings=groupings_for(10, ks=(2,)))
    assert model.branch_taps == ["layer3"]
    model = ssal_models.build_model("resnet18", "gapcat", 10, stages=["layer1", "layer3"], widths=[4, 8])
    assert model.backbone.fc.in_features == 512 + 8 + 16
    with pytest.raises(ValueError, match="unknown option 'eta' for method 'gapcat'"):
        ssal_models.build_model("resnet18", "gapcat", 10, eta=0.3)
