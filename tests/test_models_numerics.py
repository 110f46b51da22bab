"""channels_last, autocast (bf16 / fp16 forward/backward on CPU) and fp16 numerical safety of every loss."""
import pytest
import torch
from torch import nn

import ssal_models
from ssal_models.grouping import random_grouping

METHODS = ["baseline", "ssal", "gapcat", "dks", "ds"]
C = 10


def build(method, **extra):
    options = {"groupings": [random_grouping(C, k, i) for i, k in enumerate((2, 5))]} \
        if method in ("ssal", "gapcat") else {}
    torch.manual_seed(0)
    return ssal_models.build_model("resnet18", method, C, **options, **extra)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_matches_contiguous_and_stays_channels_last(method):
    model = build(method).eval()
    x = torch.randn(2, 3, 32, 32)
    branch_convs = [m for m in model.branches.modules() if isinstance(m, nn.Conv2d)]
    formats = []
    for conv in branch_convs:
        conv.register_forward_hook(
            lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        reference = model(x)
        formats.clear()
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert all(formats) and len(formats) == len(branch_convs)  # no branch conv falls back to NCHW
    for name in reference:
        torch.testing.assert_close(out[name], reference[name], atol=1e-4, rtol=1e-4)


# bf16 for every method; fp16 (slow on CPU) for one method of each branch kind
@pytest.mark.parametrize("method,dtype", [(m, torch.bfloat16) for m in METHODS]
                         + [("ssal", torch.float16), ("dks", torch.float16)])
def test_autocast_forward_backward_channels_last(method, dtype):
    model = build(method, blurpool=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([1, 7])
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss, parts = model.method.loss(out, targets)
        rules = model.method.predict(out)
        extra = model.method.extra_metrics(out, targets)
    assert all(v.dtype == dtype for v in out.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in parts.values())
    assert all(v.dtype == torch.float32 and v.shape == (2, C) for v in rules.values())
    assert all(v.dtype == torch.bool and v.shape == (2,) for v in extra.values())
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for index in range(len(model.branches)):  # every branch learns
        assert any(g.abs().sum() > 0 for name, g in grads.items() if name.startswith(f"branches.{index}."))


def huge_outputs(method_obj, names_and_widths, magnitude=1e4):
    generator = torch.Generator().manual_seed(0)
    return {name: (torch.randn(8, w, generator=generator).sign() * magnitude
                   * torch.rand(8, w, generator=generator)).half().requires_grad_()
            for name, w in names_and_widths}


@pytest.mark.parametrize("method", ["baseline", "ssal", "dks", "ds"])
def test_losses_and_rules_are_finite_on_fp16_logits_of_magnitude_1e4(method):
    model = build(method)
    names = ["main"] + model.branch_names
    widths = [C] + ([2, 5] if method == "ssal" else [C] * len(model.branch_names))
    out = huge_outputs(model.method, list(zip(names, widths)))
    targets = torch.arange(8) % C
    with torch.autocast("cpu", dtype=torch.float16):
        loss, parts = model.method.loss(out, targets)
        rules = model.method.predict(out)
    assert torch.isfinite(loss) and loss > 100  # wrong by ~1e4: large, but finite
    assert all(torch.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(v).all() for v in rules.values())
    loss.backward()
    assert all(torch.isfinite(out[n].grad).all() for n in names)


def test_fp16_kl_is_exact_where_probabilities_underflow():
    # p_j puts all its mass on one class; fp16 exponentials of -1e4 are 0: the KL must be the
    # float64 value, not inf / nan (a naive p * log p would give 0 * -inf)
    from ssal_models.dks import synergy_kl

    a = torch.tensor([[1e4, 0.0, -1e4]]).half()
    b = torch.tensor([[0.0, 1e4, -1e4]]).half()
    with torch.autocast("cpu", dtype=torch.float16):
        kl = synergy_kl([torch.log_softmax(a.float(), 1), torch.log_softmax(b.float(), 1)])
    assert kl.item() == pytest.approx(2e4, rel=1e-3)


def test_meta_build_then_materialise_gives_a_working_model():
    with torch.device("meta"):
        model = build("ssal")
    assert model.method.class_to_group_0.device.type == "meta"
    real = build("ssal")
    model = model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())  # buffers (groupings) come back from the checkpoint
    assert torch.equal(model.method.class_to_group_1, real.method.class_to_group_1)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out["ssal.1"]).all()
