"""``head: authors``: the SSAL authors' ImageNet heads (their ``pytorch/aux_nets.py``), built for
every arch from the tap's channels; parameter counts against the figures of the authors' model."""
import pytest
import torch
from torch import nn

import ssal_models
from ssal_models.authors_heads import AuthorsSSALHead
from ssal_models.grouping import random_grouping

# the authors' ResNet-50 heads (groups 200 / 334 / 500 after layer1 / layer2 / layer3), counted
# from their aux_nets.py: 4.38 M / 4.06 M / 3.45 M parameters
AUTHORS_RESNET50 = [4.38e6, 4.06e6, 3.45e6]


def groupings(num_classes, ks):
    return [random_grouping(num_classes, k, i) for i, k in enumerate(ks)]


def test_resnet50_head_parameters_match_the_authors():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "ssal", 1000, groupings=groupings(1000, [200, 334, 500]),
                                        head="authors")
    counts = ssal_models.count_parameters(model)
    for index, expected in enumerate(AUTHORS_RESNET50):
        assert abs(counts[f"ssal.{index}"] - expected) <= 0.01 * expected, (index, counts)
    heads = sum(counts[f"ssal.{i}"] for i in range(3))
    assert abs(heads / counts["backbone"] - 0.465) < 0.005
    # the light heads stay the default, and are several times smaller
    with torch.device("meta"):
        light = ssal_models.build_model("resnet50", "ssal", 1000, groupings=groupings(1000, [200, 334, 500]))
    assert sum(ssal_models.count_parameters(light)[f"ssal.{i}"] for i in range(3)) < heads / 4


def test_layer_for_layer_structure_of_the_resnet50_heads():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "ssal", 1000, groupings=groupings(1000, [200, 334, 500]),
                                        head="authors")
    first, second, third = model.branches
    assert all(isinstance(h, AuthorsSSALHead) for h in model.branches)
    # layer1's head: the extra unpadded 3x3 stride-2 conv on the 256 tap channels, then C, D, E, D, E
    assert (first.cbr1.conv.in_channels, first.cbr1.conv.out_channels, first.cbr1.conv.kernel_size,
            first.cbr1.conv.stride, first.cbr1.conv.padding) == (256, 256, (3, 3), (2, 2), (0, 0))
    assert second.cbr1 is None and third.cbr1 is None
    assert [first.inception1.branch1x1.conv.in_channels, second.inception1.branch1x1.conv.in_channels,
            third.inception1.branch1x1.conv.in_channels] == [256, 512, 1024]
    assert [len(h.inception2) for h in model.branches] == [4, 4, 2]
    assert [b.out_channels for b in first.inception2] == [256, 748, 256, 1496]
    assert [b.out_channels for b in third.inception2] == [256, 1496]
    assert [h.fc.out_features for h in model.branches] == [200, 334, 500]
    # every conv is bias-free, followed by a BN of eps 1e-3 (torchvision's Inception BasicConv2d)
    bns = [m for m in first.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in first.modules() if isinstance(m, nn.Conv2d)]
    assert len(bns) == len(convs) and all(bn.eps == 1e-3 for bn in bns) and all(c.bias is None for c in convs)


def test_every_head_ends_at_1496x6x6_at_224_px():
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet50", "ssal", 10, groupings=groupings(10, [3, 4, 5]), head="authors")
    shapes = []
    hooks = [head.inception2.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for head in model.branches]
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    assert shapes == [(1496, 6, 6)] * 3
    assert [tuple(out[f"ssal.{i}"].shape) for i in range(3)] == [(1, 3), (1, 4), (1, 5)]


@pytest.mark.parametrize("arch, tap_channels", [("resnet18", [64, 128, 256]), ("resnet152", [256, 512, 1024])])
def test_heads_adapt_to_the_taps_of_every_arch(arch, tap_channels):
    model = ssal_models.build_model(arch, "ssal", 10, groupings=groupings(10, [3, 4, 5]), head="authors")
    assert [h.inception1.branch1x1.conv.in_channels for h in model.branches] == tap_channels
    assert model.branches[0].cbr1.conv.in_channels == tap_channels[0]
    if arch == "resnet18":  # a real forward + backward at the smallest size the heads take (64 px)
        out = model(torch.randn(2, 3, 64, 64))
        total, parts = model.method.loss(out, torch.tensor([1, 7]))
        total.backward()
        assert torch.isfinite(total) and set(parts) == {"ce/main", "ce/ssal.0", "ce/ssal.1", "ce/ssal.2"}
        assert all(p.grad is not None for p in model.branches.parameters())


def test_inner_tap_gets_the_head_of_its_stride():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "ssal", 10, groupings=groupings(10, [3, 4]), head="authors",
                                        stages=["layer1.1", "layer4"])
    assert [h.pool for h in model.branches] == [2, 0]
    assert model.branches[1].inception1.branch1x1.conv.in_channels == 2048


def test_gapcat_with_the_authors_heads_reads_their_1496_features():
    with torch.device("meta"):
        model = ssal_models.build_model("resnet50", "gapcat", 1000, groupings=groupings(1000, [200, 334, 500]),
                                        head="authors")
    assert model.backbone.fc.in_features == 2048 + 3 * 1496
    assert all(h.fc is None for h in model.branches)


@pytest.mark.parametrize("method", ["ssal", "gapcat"])
@pytest.mark.parametrize("options, match", [
    ({"head": "inception"}, "option 'head' must be one of light, authors"),
    ({"head": "authors", "widths": [8, 8, 8]}, "authors' heads have fixed widths"),
])
def test_bad_head_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        ssal_models.build_model("resnet18", method, 10, groupings=groupings(10, [3, 4, 5]), **options)


def test_channels_last_and_bf16_autocast_through_the_authors_heads():
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet18", "ssal", 10, groupings=groupings(10, [3, 4, 5]), head="authors")
    x = torch.randn(2, 3, 64, 64)
    convs = [m for m in model.branches.modules() if isinstance(m, nn.Conv2d)]
    formats = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
    model.eval()
    with torch.no_grad():
        reference = model(x)
        formats.clear()
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert len(formats) == len(convs) and all(formats)  # no head conv falls back to NCHW
    for name in reference:
        torch.testing.assert_close(out[name], reference[name], atol=1e-4, rtol=1e-4)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = model.method.loss(model(x.contiguous(memory_format=torch.channels_last)), torch.tensor([1, 7]))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(p.grad).all() for p in model.branches.parameters())
