"""Losses and prediction rules of SSAL, DKS, DS against naive float64 implementations; +LC."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssal_models
from ssal_models.dks import synergy_kl
from ssal_models.grouping import random_grouping

C = 12


def ssal_model(ks=(2, 3, 4), **options):
    groupings = [random_grouping(C, k, seed=i) for i, k in enumerate(ks)]
    return ssal_models.build_model("resnet18", "ssal", C, groupings=groupings, **options), groupings


def fake_outputs(names_and_widths, n=6, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(n, width, generator=generator) * scale).requires_grad_()
            for name, width in names_and_widths}


# ----------------------------------------------------------------------------- SSAL

@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ssal_joint_rule_equals_the_naive_product(eta):
    model, groupings = ssal_model(eta=eta)
    out = fake_outputs([("main", C), ("ssal.0", 2), ("ssal.1", 3), ("ssal.2", 4)])
    rules = model.method.predict(out)
    assert list(rules) == ["main", "joint"]
    f = out["main"].detach().double()
    product = torch.softmax(f, dim=1)
    for i, g in enumerate(groupings):
        p = torch.softmax(out[f"ssal.{i}"].detach().double(), dim=1)
        for c in range(C):
            product[:, c] = product[:, c] * p[:, g[c]] ** eta
    expected = torch.log(product / product.sum(dim=1, keepdim=True))
    assert rules["joint"].dtype == torch.float32
    torch.testing.assert_close(rules["joint"].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rules["main"].double(), torch.log_softmax(f, 1), atol=1e-6, rtol=0)
    # and it is not just the main rule
    assert not torch.allclose(rules["joint"], rules["main"], atol=1e-2)


def test_ssal_loss_and_group_metric():
    model, groupings = ssal_model(loss_weights=[1.0, 0.5, 0.25, 2.0])
    out = fake_outputs([("main", C), ("ssal.0", 2), ("ssal.1", 3), ("ssal.2", 4)])
    targets = torch.tensor([0, 3, 5, 7, 11, 2])
    total, parts = model.method.loss(out, targets)
    assert list(parts) == ["ce/main", "ce/ssal.0", "ce/ssal.1", "ce/ssal.2"]
    expected_parts = [F.cross_entropy(out["main"].double(), targets)]
    expected_parts += [F.cross_entropy(out[f"ssal.{i}"].double(), torch.as_tensor(g)[targets])
                       for i, g in enumerate(groupings)]
    for value, expected in zip(parts.values(), expected_parts):
        assert not value.requires_grad
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    weighted = sum(w * e for w, e in zip([1.0, 0.5, 0.25, 2.0], expected_parts))
    assert total.item() == pytest.approx(weighted.item(), rel=1e-5)
    extra = model.method.extra_metrics(out, targets)
    assert list(extra) == ["group_top1/ssal.0", "group_top1/ssal.1", "group_top1/ssal.2"]
    for i, g in enumerate(groupings):
        expected = out[f"ssal.{i}"].argmax(1).numpy() == np.asarray(g)[targets.numpy()]
        assert extra[f"group_top1/ssal.{i}"].dtype == torch.bool
        assert extra[f"group_top1/ssal.{i}"].tolist() == expected.tolist()


def test_label_smoothing_set_by_the_engine_applies_to_every_ce():
    model, groupings = ssal_model(ks=(3,))
    out = fake_outputs([("main", C), ("ssal.0", 3)])
    targets = torch.arange(6)
    model.method.label_smoothing = 0.1
    _, parts = model.method.loss(out, targets)
    expected = F.cross_entropy(out["ssal.0"], torch.as_tensor(groupings[0])[targets], label_smoothing=0.1)
    assert parts["ce/ssal.0"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_linear_combination_starts_at_joint_and_fits_better():
    model, groupings = ssal_model()
    method = model.method
    generator = torch.Generator().manual_seed(1)
    n = 600
    targets = torch.randint(0, C, (n,), generator=generator)
    # a weak main head plus informative group heads, with one branch that is misleading:
    # the best linear combination is not the fixed-eta joint rule
    out = {"main": torch.randn(n, C, generator=generator) + 1.0 * F.one_hot(targets, C)}
    for i, g in enumerate(groupings):
        group_targets = torch.as_tensor(g)[targets]
        sign = -1.0 if i == 2 else 1.0
        out[f"ssal.{i}"] = torch.randn(n, g.max() + 1, generator=generator) + sign * 2.0 * F.one_hot(group_targets)
    start = ssal_models.fit_linear_combination(method, out, targets, epochs=0)
    method.set_linear_combination(start)
    rules = method.predict(out)
    torch.testing.assert_close(rules["lc"], rules["joint"], atol=1e-5, rtol=0)

    head = ssal_models.fit_linear_combination(method, out, targets, epochs=30, batch_size=128, lr=1e-2)
    method.set_linear_combination(head)
    rules = method.predict(out)
    assert list(rules) == ["main", "joint", "lc"]
    nll = {rule: F.nll_loss(lp, targets).item() for rule, lp in rules.items()}
    assert nll["lc"] < nll["joint"] - 0.05
    assert not any(p.requires_grad for p in head.parameters())
    counts = ssal_models.count_parameters(model)
    assert counts["lc_head"] == (C + 2 + 3 + 4) * C + C
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    with pytest.raises(ValueError, match="does not fit"):
        method.set_linear_combination(ssal_models.LinearCombinationHead(C, [2, 3]))


# ----------------------------------------------------------------------------- DKS / DS

def naive_dks_kl(logits):
    """Σ_{i≠j} mean_n Σ_c p_j (log p_j - log p_i), float64, explicit loops."""
    logp = [torch.log_softmax(z.detach().double(), 1) for z in logits]
    total = 0.0
    for i in range(len(logp)):
        for j in range(len(logp)):
            if i != j:
                total += (logp[j].exp() * (logp[j] - logp[i])).sum(1).mean()
    return total


def test_dks_loss_equals_a_naive_implementation():
    model = ssal_models.build_model("resnet18", "dks", C, stages=["layer1", "layer2", "layer3"],
                                    ce_weights=[1.0, 0.5, 0.7, 0.9], kl_weight=0.8)
    names = ["main", "dks.0", "dks.1", "dks.2"]
    out = fake_outputs([(n, C) for n in names])
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    total, parts = model.method.loss(out, targets)
    assert list(parts) == ["ce/main", "ce/dks.0", "ce/dks.1", "ce/dks.2", "kl"]
    ces = [F.cross_entropy(out[n].detach().double(), targets).item() for n in names]
    kl = naive_dks_kl([out[n] for n in names]).item()
    assert [parts[f"ce/{n}"].item() for n in names] == pytest.approx(ces, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(sum(w * c for w, c in zip([1.0, 0.5, 0.7, 0.9], ces)) + 0.8 * kl, rel=1e-5)


def test_dks_teacher_side_gets_no_gradient():
    logits = fake_outputs([("a", C), ("b", C), ("c", C)], n=5)
    z = list(logits.values())
    synergy_kl([torch.log_softmax(v, 1) for v in z]).backward()
    p = [torch.softmax(v.detach().double(), 1) for v in z]
    n = z[0].shape[0]
    for i in range(3):
        # as a student only: d/dz_i Σ_{j≠i} KL(p_j ‖ p_i) = Σ_{j≠i} (p_i - p_j) / N
        expected = sum(p[i] - p[j] for j in range(3) if j != i) / n
        torch.testing.assert_close(z[i].grad.double(), expected, atol=1e-6, rtol=0)
    # the full (no stop-gradient) KL has a different gradient, so the check above can fail
    full = [v.detach().clone().requires_grad_() for v in z]
    logp = [torch.log_softmax(v, 1) for v in full]
    sum(F.kl_div(logp[i], logp[j], reduction="batchmean", log_target=True)
        for i in range(3) for j in range(3) if i != j).backward()
    assert not torch.allclose(full[0].grad, z[0].grad, atol=1e-4)


def test_ds_is_ce_only_and_dks_kl_weight_zero_matches_it():
    out = fake_outputs([("main", C), ("ds.0", C), ("ds.1", C)])
    targets = torch.arange(6)
    ds = ssal_models.build_model("resnet18", "ds", C).method
    total, parts = ds.loss(out, targets)
    assert list(parts) == ["ce/main", "ce/ds.0", "ce/ds.1"]
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)
    dks = ssal_models.build_model("resnet18", "dks", C, kl_weight=0.0).method
    renamed = {"main": out["main"], "dks.0": out["ds.0"], "dks.1": out["ds.1"]}
    dks_total, dks_parts = dks.loss(renamed, targets)
    assert dks_total.item() == pytest.approx(total.item(), rel=1e-6) and dks_parts["kl"] > 0


def test_dks_prediction_rules():
    method = ssal_models.build_model("resnet18", "dks", C).method
    out = fake_outputs([("main", C), ("dks.0", C), ("dks.1", C)])
    rules = method.predict(out)
    assert list(rules) == ["main", "dks.0", "dks.1", "ensemble"]
    probs = [torch.softmax(out[n].detach().double(), 1) for n in ["main", "dks.0", "dks.1"]]
    torch.testing.assert_close(rules["ensemble"].double(), torch.log(sum(probs) / 3), atol=1e-5, rtol=0)
    for name, lp in rules.items():
        torch.testing.assert_close(lp.exp().sum(1), torch.ones(6), atol=1e-5, rtol=0)
    assert method.extra_metrics(out, torch.arange(6)) == {}


def test_baseline_rules():
    method = ssal_models.build_model("resnet18", "baseline", C).method
    out = fake_outputs([("main", C)])
    total, parts = method.loss(out, torch.arange(6))
    assert list(parts) == ["ce/main"] and list(method.predict(out)) == ["main"]
    assert total.item() == pytest.approx(F.cross_entropy(out["main"], torch.arange(6)).item())


def authors_kl(logits_p, logits_q, epsilon=1e-8):
    """The DKS authors' KL_divergence (sundw2014/DKS, wrn_DKS/KL_divergence.py), in float64."""
    p, q = torch.softmax(logits_p.double(), 1), torch.softmax(logits_q.double(), 1)
    num_classes = p.shape[1]
    p, q = (p + epsilon) / (1 + num_classes * epsilon), (q + epsilon) / (1 + num_classes * epsilon)
    return (p * torch.log(p / q)).sum(1).mean()


def test_dks_eps_option_is_the_authors_smoothed_kl():
    out = fake_outputs([("main", C), ("dks.0", C), ("dks.1", C)])
    # a confident, disagreeing pair: the exact KL is far above the authors' cap of ~log(1/eps)
    out["main"] = out["main"] + 60.0 * F.one_hot(torch.arange(6) % C, C)
    out["dks.0"] = out["dks.0"] + 60.0 * F.one_hot((torch.arange(6) + 1) % C, C)
    names = ["main", "dks.0", "dks.1"]
    targets = torch.arange(6) % C
    exact = ssal_models.build_model("resnet18", "dks", C)
    smoothed = ssal_models.build_model("resnet18", "dks", C, eps=1e-8)
    _, exact_parts = exact.method.loss(out, targets)
    _, parts = smoothed.method.loss(out, targets)
    expected = sum(authors_kl(out[t].detach(), out[s].detach()) for t in names for s in names if t != s).item()
    assert parts["kl"].item() == pytest.approx(expected, rel=1e-4)
    assert exact_parts["kl"].item() == pytest.approx(naive_dks_kl([out[n] for n in names]).item(), rel=1e-5)
    assert exact_parts["kl"].item() > parts["kl"].item() + 50  # the cap bites on this pair
    # eps is DKS's only: DS has no KL; and it must be a small non-negative number
    for method, options, match in [("ds", {"eps": 1e-8}, "unknown option 'eps'"),
                                   ("dks", {"eps": -1.0}, "'eps' must be a finite number >= 0"),
                                   ("dks", {"eps": 0.5}, "'eps' must be < 0.01")]:
        with pytest.raises(ValueError, match=match):
            ssal_models.build_model("resnet18", method, C, **options)
