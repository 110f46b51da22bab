"""MAXL's collapse regulariser (batch | global | ema) on hand-built generated labels, with two real
gloo ranks for ``global``, and the label statistics on known inputs (ssal_models/maxl_labels.py)."""
from __future__ import annotations

import math

import pytest
import torch

from ssal_models import maxl_losses
from ssal_models.maxl_labels import CollapseRegulariser, label_metrics, label_sums

PSI = (3, 3, 3, 3)  # four primary classes, three auxiliary classes each
TARGETS = torch.arange(4)  # one sample per primary class: the ImageNet-scale situation
PEAK = 4.0  # logit of the chosen auxiliary class (p ~ 0.96)


def labels_logits(slots, psi=PSI, peak=PEAK):
    """(N, A) generator logits that put sample i's label on auxiliary slot ``slots[i]`` of its class
    (sample i has primary class i % C)."""
    offsets = [sum(psi[:c]) for c in range(len(psi))]
    logits = torch.zeros(len(slots), sum(psi), dtype=torch.float64)
    for i, slot in enumerate(slots):
        logits[i, offsets[i % len(psi)] + slot] = peak
    return logits.requires_grad_(True)


def collapsed(step):
    return [0, 0, 0, 0]  # every sample of a class always gets the same label


def diverse(step):
    return [(step + c) % 3 for c in range(4)]  # a class's samples spread over its three labels


def term_and_grad(reg, logits, targets=TARGETS, gather=None):
    h = reg(maxl_losses.mask_log_softmax(logits, targets, maxl_losses.hierarchy_mask(PSI)), gather)
    (grad,) = torch.autograd.grad(h, logits)
    return h.detach(), grad


def run_steps(estimate, labels, steps=6, decay=0.9):
    reg = CollapseRegulariser(PSI, estimate, ema_decay=decay).double()
    for step in range(steps):
        h, grad = term_and_grad(reg, labels_logits(labels(step)))
    return float(h), grad


def test_batch_form_is_the_authors_entropy_term():
    torch.manual_seed(0)
    logits = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    lp = maxl_losses.mask_log_softmax(logits, y, maxl_losses.hierarchy_mask(PSI))
    assert torch.allclose(CollapseRegulariser(PSI, "batch")(lp), maxl_losses.entropy_term(lp), atol=1e-12)


def test_one_sample_per_class_ema_distinguishes_collapsed_from_diverse_batch_does_not():
    h_col, g_col = run_steps("batch", collapsed)
    h_div, g_div = run_steps("batch", diverse)
    # per batch, each class's mean label is one sample's label: both look the same to `batch`
    assert h_col == pytest.approx(h_div, abs=1e-12)
    assert g_col.norm() == pytest.approx(g_div.norm(), rel=1e-9)
    assert g_col.norm() > 0  # ... and it pushes every (diverse or not) label toward uniform

    e_col, ge_col = run_steps("ema", collapsed)
    e_div, ge_div = run_steps("ema", diverse)
    # the running per-class mean: collapsed stays peaked (H near its maximum), diverse spreads
    # over the three labels (H near -log 3, relative to the same class-frequency constant)
    const = math.log(1 / 4)  # sum_c w_c log w_c with w_c = 1/4
    p_peak = math.exp(PEAK) / (math.exp(PEAK) + 2)
    peaked = p_peak * math.log(p_peak) + 2 * ((1 - p_peak) / 2) * math.log((1 - p_peak) / 2)
    assert e_col - const == pytest.approx(peaked, abs=1e-9)
    assert e_div - const < -0.8 * math.log(3)
    assert e_col - e_div > 0.6  # nats
    # the gradient only acts against collapse: a diverse generator is barely pushed
    assert ge_div.norm() < 0.3 * ge_col.norm()


def test_ema_with_zero_decay_equals_the_batch_form_value_and_gradient():
    torch.manual_seed(1)
    y = torch.randint(0, 4, (10,))
    reg_ema = CollapseRegulariser(PSI, "ema", ema_decay=0.0).double()
    reg_batch = CollapseRegulariser(PSI, "batch").double()
    for _ in range(2):
        logits = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
        h_e, g_e = term_and_grad(reg_ema, logits, y)
        h_b, g_b = term_and_grad(reg_batch, logits, y)
        assert h_e == pytest.approx(float(h_b), abs=1e-12)
        assert torch.allclose(g_e, g_b, atol=1e-12)


def test_ema_state_is_a_decayed_per_class_mean_and_skips_non_finite_batches():
    reg = CollapseRegulariser(PSI, "ema", ema_decay=0.5).double()
    lp = maxl_losses.mask_log_softmax(labels_logits([0, 1, 2, 0]), TARGETS, maxl_losses.hierarchy_mask(PSI)).detach()
    reg(lp)
    reg(lp)
    assert torch.allclose(reg.ema_sample_count, torch.full((4,), 1.5, dtype=torch.float64))
    assert torch.allclose(reg.running_mean(), lp.exp().sum(0), atol=1e-12)  # constant input -> itself
    before = reg.ema_label_sum.clone()
    reg(lp, update=False)
    bad = lp.clone()
    bad[0, 0] = float("nan")
    reg(bad)
    assert torch.equal(reg.ema_label_sum, before)
    assert set(reg.state_dict()) == {"ema_label_sum", "ema_sample_count"}  # checkpointed
    with pytest.raises(ValueError, match="entropy_estimate"):
        CollapseRegulariser(PSI, "median")
    with pytest.raises(ValueError, match="entropy_ema_decay"):
        CollapseRegulariser(PSI, "ema", ema_decay=1.0)


def test_models_library_options():
    import ssal_models

    model = ssal_models.build_model("resnet18", "maxl", 4, psi=3, generator_arch="resnet10",
                                    entropy_estimate="ema", entropy_ema_decay=0.95, schedule="alternate_epochs")
    assert model.method.collapse.estimate == "ema" and model.method.collapse.ema_decay == 0.95
    assert model.method.training_options["schedule"] == "alternate_epochs"
    for bad, key in (({"entropy_estimate": "local"}, "entropy_estimate"), ({"entropy_ema_decay": 1.0}, "entropy_ema_decay"),
                     ({"schedule": "weekly"}, "schedule")):
        with pytest.raises(ValueError, match=key):
            ssal_models.build_model("resnet18", "maxl", 4, **bad)


# ----------------------------------------------------------------------------- two gloo ranks

WORLD = 2


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        def gather(t):
            parts = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(parts, t.contiguous())
            return torch.stack(parts)

        results = {}
        # collapsed: both ranks put class c on label 0; diverse: rank r puts it on label r
        for name, slots in (("collapsed", [0, 0, 0, 0]), ("diverse", [rank] * 4)):
            for estimate in ("batch", "global"):
                h, grad = term_and_grad(CollapseRegulariser(PSI, estimate).double(), labels_logits(slots),
                                        gather=gather)
                results[f"{name}/{estimate}"] = (float(h), grad)
        torch.manual_seed(5)  # the same global batch on both ranks; each takes its half
        logits = torch.randn(2 * 6, 12, dtype=torch.float64)
        y = torch.randint(0, 4, (12,))
        mine = slice(6 * rank, 6 * rank + 6)
        for estimate in ("global", "ema"):
            reg = CollapseRegulariser(PSI, estimate, ema_decay=0.7).double()
            for _ in range(2):
                h, grad = term_and_grad(reg, logits[mine].clone().requires_grad_(True), y[mine], gather=gather)
            results[f"random/{estimate}"] = (float(h), grad, reg.ema_label_sum.clone())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_estimate_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as tmp

    tmp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        # each rank's batch holds every class once: `batch` cannot tell; `global` sees both ranks
        assert r["collapsed/batch"][0] == pytest.approx(r["diverse/batch"][0], abs=1e-12)
        assert r["collapsed/global"][0] - r["diverse/global"][0] > 0.5
    # the global value and gradient equal one process holding the whole global batch; each rank's
    # gradient is W x its share, so averaging the ranks' generator gradients gives dH/dphi
    torch.manual_seed(5)
    logits = torch.randn(12, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    for estimate in ("global", "ema"):
        reg = CollapseRegulariser(PSI, estimate, ema_decay=0.7).double()
        for _ in range(2):
            h, grad = term_and_grad(reg, logits.clone().requires_grad_(True), y)
        for rank, r in enumerate(ranks):
            h_r, grad_r = r[f"random/{estimate}"][:2]
            assert h_r == pytest.approx(float(h), abs=1e-12)
            assert torch.allclose(grad_r, WORLD * grad[6 * rank:6 * rank + 6], atol=1e-12)
        assert torch.equal(ranks[0][f"random/{estimate}"][2], ranks[1][f"random/{estimate}"][2])
        assert torch.allclose(ranks[0][f"random/{estimate}"][2], reg.ema_label_sum, atol=1e-12)


# ----------------------------------------------------------------------------- label statistics


def test_label_statistics_on_known_inputs():
    psi = (2, 3, 1)
    mask = maxl_losses.hierarchy_mask(psi)
    # class 0: uniform; class 1: one-hot on its 2nd label, then 1/2-1/2 on its 1st and 3rd;
    # class 2: one auxiliary class (no choice)
    probs = torch.tensor([[0.5, 0.5, 0, 0, 0, 0],
                          [0, 0, 0, 1.0, 0, 0],
                          [0, 0, 0.5, 0, 0.5, 0],
                          [0, 0, 0, 0, 0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2])
    lp = probs.log().masked_fill(~mask[y], float("-inf"))
    half = label_sums(lp[:2], y[:2], psi)  # summable: two batches == one
    rest = label_sums(lp[2:], y[2:], psi)
    sums = {k: half[k] + rest[k] for k in half}
    whole = label_sums(lp, y, psi)
    assert all(torch.allclose(sums[k], whole[k]) for k in whole)
    m = label_metrics(sums, psi)
    ln2, ln3 = math.log(2), math.log(3)
    assert m["label_entropy"] == pytest.approx((ln2 + 0 + ln2 + 0) / 4)
    assert m["label_entropy_frac"] == pytest.approx((ln2 / ln2 + 0 + ln2 / ln3) / 3)  # psi = 1 left out
    assert m["label_max_prob"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    # argmax (first of ties): class 0 -> label 0, class 1 -> labels 3 and 2, class 2 -> label 5
    assert m["counts"] == [1, 0, 1, 1, 0, 1] and m["label_fraction"] == pytest.approx(4 / 6)
    # class 1's mean distribution: (1/4, 1/2, 1/4)
    h1 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert m["marginal_entropy"] == pytest.approx([ln2, h1, 0.0])
    assert m["label_marginal_entropy"] == pytest.approx((ln2 + h1 + 0) / 3)
    assert m["label_marginal_entropy_frac"] == pytest.approx((1 + h1 / ln3) / 2)
    unseen = label_metrics(label_sums(lp[:1], y[:1], psi), psi)
    assert unseen["marginal_entropy"][0] == pytest.approx(ln2) and unseen["marginal_entropy"][1:] == [None, None]
