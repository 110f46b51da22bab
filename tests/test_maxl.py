"""MAXL model side (ssal_models.maxl with its maxl_losses, maxl_nets, maxl_meta; ssal_models.hierarchies):
numerics, meta-gradients, a tiny alternation, the entropy term's effect on label usage, and the
models-library integration.  All CPU, tiny networks (the whole file runs in well under a minute)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssal_models import hierarchies as hz
from ssal_models import maxl as mx
from ssal_models import maxl_losses, maxl_nets

PSI = (2, 3, 1)  # deliberately uneven


def tiny_model(psi=PSI, in_dim=4, width=5, gen_width=3, meta_order="second", entropy_weight=0.2,
               dtype=torch.float64, seed=0):
    """Multi-task MLP (with BatchNorm, to check batch-stat mode) + linear-head generator (with BN)."""
    torch.manual_seed(seed)
    c, a = len(psi), sum(psi)
    net = maxl_nets.MultiTaskNet(nn.Sequential(nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.Tanh()), width, c, a)
    gen = maxl_nets.LabelGenerator(nn.Sequential(nn.Linear(in_dim, gen_width), nn.BatchNorm1d(gen_width), nn.Tanh()),
                                   gen_width, psi, hidden=0)
    model = mx.MaxlModel(net, mx.MaxlMethod(gen, psi, entropy_weight=entropy_weight, meta_order=meta_order))
    return model.to(dtype)


def tiny_batch(n=16, in_dim=4, c=len(PSI), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_dim, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def stepped_optimizer(model, x, y, lr=0.3, momentum=0.9, weight_decay=1e-3):
    """An SGD optimiser with momentum buffers (one real multi-task step taken)."""
    opt = torch.optim.SGD(model.multitask_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, _ = model.method.loss(model(x), y)
    total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ hierarchy


def test_cifar100_hierarchy_matches_table1_and_authors_code():
    # 100 distinct fine classes, 5 per coarse class; authors' 20->10 and 10->3 dicts (create_dataset.py)
    assert len(set(hz.CIFAR100_FINE_NAMES)) == 100
    assert sorted(hz.CIFAR100_FINE_TO_COARSE) == sorted(list(range(20)) * 5)
    authors_10 = {0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7,
                  10: 8, 11: 0, 12: 1, 13: 3, 14: 4, 15: 0, 16: 2, 17: 5, 18: 9, 19: 9}
    assert hz.CIFAR100_COARSE_TO_L10 == tuple(authors_10[i] for i in range(20))
    assert hz.CIFAR100_L10_TO_L3 == (0, 0, 0, 0, 0, 1, 2, 2, 2, 2)
    assert hz.CIFAR100_FINE_TO_COARSE[:5] == (4, 1, 14, 8, 0)  # apple, aquarium_fish, baby, bear, beaver
    assert hz.cifar100_level_labels(hz.CIFAR100_FINE_NAMES.index("shark")) == (0, 2, 1, 73)
    assert hz.cifar100_psi(20, 100) == [5] * 20
    assert hz.cifar100_psi(3, 10) == [5, 1, 4]
    assert hz.cifar100_psi(3, 100) == [50, 15, 35]
    assert hz.cifar100_psi(10, 20) == [3, 2, 2, 2, 1, 3, 3, 1, 1, 2]
    for pri in (3, 10, 20):
        for aux in (10, 20, 100):
            if aux > pri:
                assert sum(hz.cifar100_psi(pri, aux)) == aux
    with pytest.raises(ValueError):
        hz.cifar100_psi(20, 10)


def test_psi_helpers_and_mask():
    assert hz.psi_from_parents([0, 0, 2, 1, 2, 2]) == [2, 1, 3]
    with pytest.raises(ValueError, match="own no auxiliary"):
        hz.psi_from_parents([1, 1], num_primary=2)
    assert hz.make_psi(3) == [5, 5, 5]
    assert hz.make_psi(2, 4) == [4, 4]
    assert hz.make_psi(2, [1, 7]) == [1, 7]
    with pytest.raises(ValueError):
        hz.make_psi(3, [1, 2])
    assert mx.resolve_psi(20, "cifar100:20-100") == [5] * 20
    with pytest.raises(ValueError):
        mx.resolve_psi(10, "cifar100:20-100")
    mask = maxl_losses.hierarchy_mask(PSI)
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == list(PSI) and mask.sum(0).tolist() == [1] * 6
    assert maxl_losses.aux_owner(PSI).tolist() == [0, 0, 1, 1, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [2, 3, 4]  # contiguous blocks


# ------------------------------------------------------------------------------ numerics


def test_mask_softmax_zero_outside_sums_to_one_and_matches_formula():
    torch.manual_seed(0)
    mask = maxl_losses.hierarchy_mask(PSI)
    logits = torch.randn(32, 6, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (32,))
    p = maxl_losses.mask_log_softmax(logits, y, mask).exp()
    assert torch.all(p[~mask[y]] == 0)
    assert torch.allclose(p.sum(1), torch.ones(32, dtype=torch.float64), atol=1e-12)
    m = mask[y].double()  # the paper's formula (exact M, no epsilon)
    ref = logits.exp() * m / (logits.exp() * m).sum(1, keepdim=True)
    assert torch.allclose(p, ref, atol=1e-12)


def test_mask_softmax_finite_under_fp16():
    torch.manual_seed(0)
    mask = maxl_losses.hierarchy_mask([5] * 4)
    y = torch.randint(0, 4, (64,))
    logits = (torch.randn(64, 20) * 1e4).half().requires_grad_(True)
    assert torch.isinf(logits.detach().exp()).any()  # the naive formula would overflow
    lp = maxl_losses.mask_log_softmax(logits, y, mask)
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp[mask[y]]).all() and torch.all(lp[~mask[y]] == float("-inf"))
    p = lp.exp()
    assert torch.isfinite(p).all() and torch.all(p[~mask[y]] == 0)
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-6)
    (maxl_losses.entropy_term(lp) + maxl_losses.soft_focal_loss(torch.log_softmax(logits.float(), 1), p)).backward()
    assert torch.isfinite(logits.grad).all()
    # and under CPU autocast (fp16): a linear layer producing ~1e4 logits
    lin = nn.Linear(8, 20)
    with torch.no_grad():
        lin.weight.mul_(3e4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = lin(torch.randn(64, 8))
        lp = maxl_losses.mask_log_softmax(out, y, mask)
    assert out.dtype == torch.float16 and out.abs().max() > 1e3
    assert torch.isfinite(lp.exp()).all() and torch.allclose(lp.exp().sum(1), torch.ones(64), atol=1e-6)


def test_focal_losses_equal_naive_float64():
    torch.manual_seed(0)
    logits = torch.randn(40, 7) * 4
    y = torch.randint(0, 7, (40,))
    t = torch.softmax(torch.randn(40, 7) * 2, 1)
    t[:, :2] = 0  # soft targets with zeros, like masked generator outputs
    t = t / t.sum(1, keepdim=True)
    q = torch.softmax(logits.double(), 1)
    naive_hard = (-(1 - q.gather(1, y[:, None])) ** 2 * q.gather(1, y[:, None]).log()).mean()
    naive_soft = (-(t.double() * (1 - q) ** 2 * q.log()).sum(1)).mean()
    lp = torch.log_softmax(logits, 1)
    assert torch.allclose(maxl_losses.focal_loss(lp, y).double(), naive_hard, rtol=1e-5)
    assert torch.allclose(maxl_losses.soft_focal_loss(lp, t).double(), naive_soft, rtol=1e-5)
    # float64 in, float64 out, exact to rounding; gamma=0 is cross-entropy
    assert torch.allclose(maxl_losses.focal_loss(lp.double(), y), naive_hard, rtol=1e-6)
    assert torch.allclose(maxl_losses.focal_loss(lp, y, gamma=0.0), F.cross_entropy(logits, y), rtol=1e-6)
    one_hot = F.one_hot(y, 7).float()
    assert torch.allclose(maxl_losses.soft_focal_loss(lp, one_hot), maxl_losses.focal_loss(lp, y), rtol=1e-6)


def test_entropy_term_and_label_statistics():
    torch.manual_seed(0)
    mask = maxl_losses.hierarchy_mask(PSI)
    y = torch.tensor([0, 0, 1, 0])  # class 2's auxiliary class gets no mass in this batch
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    lp = maxl_losses.mask_log_softmax(logits, y, mask)
    h = maxl_losses.entropy_term(lp)
    pbar = lp.exp().mean(0)
    nz = pbar > 0
    assert torch.allclose(h, (pbar[nz] * pbar[nz].log()).sum())
    h.backward()
    assert torch.isfinite(logits.grad).all()
    counts = maxl_losses.label_counts(lp)
    assert counts.sum() == 4 and counts.shape == (6,) and counts[5] == 0
    assert maxl_losses.used_label_fraction(torch.tensor([3, 0, 1, 0])) == 0.5


# ------------------------------------------------------------------------------ meta step


@pytest.mark.parametrize("entropy_weight", [0.0, 0.2])
def test_second_order_meta_gradient_equals_finite_differences_float64(entropy_weight):
    model = tiny_model(entropy_weight=entropy_weight)
    x, y = tiny_batch()
    opt = stepped_optimizer(model, x, y)  # virtual step with lr, weight decay and momentum buffers
    model.generator_step(x, y, net_optimizer=opt)
    gparams = model.generator_parameters()
    analytic = flat([p.grad for p in gparams])

    def objective():
        meta, h = model.method.meta_objective(model.net, x, y, net_optimizer=opt)
        return float((meta + entropy_weight * h).detach())

    h = 1e-6
    numeric = []
    with torch.no_grad():
        for p in gparams:
            for i in range(p.numel()):
                p.view(-1)[i] += h
                with torch.enable_grad():
                    fp = objective()
                p.view(-1)[i] -= 2 * h
                with torch.enable_grad():
                    fm = objective()
                p.view(-1)[i] += h
                numeric.append((fp - fm) / (2 * h))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    assert numeric.norm() > 1e-4  # a non-trivial gradient
    assert rel_err(analytic, numeric) < 1e-3


def test_meta_objective_is_a_virtual_sgd_step_and_leaves_the_net_untouched():
    model = tiny_model()
    x, y = tiny_batch()
    opt = stepped_optimizer(model, x, y, lr=0.3, momentum=0.9, weight_decay=1e-3)
    model.eval()  # the meta step must still use BN batch statistics (and restore eval mode)
    before = copy.deepcopy(model.net.state_dict())
    meta, _ = model.method.meta_objective(model.net, x, y, net_optimizer=opt)
    with torch.no_grad():  # the generator runs in the caller's mode (here eval)
        p = maxl_losses.mask_log_softmax(model.method.generator(x), y, model.method.mask).exp()
    model.train()
    # naive: copy the net, take one real SGD step (same momentum/wd) on L_pri + L_aux, evaluate L_pri
    net2 = copy.deepcopy(model.net).train()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(opt.state_dict())
    pri, aux = model.method.multitask_loss(net2(x), y, p)
    (pri + aux).backward()
    opt2.step()
    ref = maxl_losses.focal_loss(torch.log_softmax(net2(x)["main"], 1), y)
    assert torch.allclose(meta, ref, rtol=1e-10)
    # generator_step: net parameters, BN running stats, .grad and train/eval flags untouched
    model.eval()
    model.generator_step(x, y, net_optimizer=opt)
    assert not model.net.training and not model.net.backbone[1].training
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.multitask_parameters())
    assert all(p.grad is not None for p in model.generator_parameters())


def test_first_order_close_to_second_order():
    """Finite-difference (DARTS) meta-gradient vs exact second order, meta part alone (lambda = 0).
    Measured relative differences on this problem (eps = 0.01 / ||u||): 1.8e-4 in float64,
    4.5e-4 in float32 (2e-5 / 4e-4 with lambda = 0.2, whose term both compute exactly)."""
    errs = {}
    for dtype, tol in ((torch.float64, 1e-3), (torch.float32, 5e-3)):
        grads = {}
        for order in ("second", "first"):
            model = tiny_model(meta_order=order, dtype=dtype, entropy_weight=0.0)
            x, y = tiny_batch(dtype=dtype)
            opt = stepped_optimizer(model, x, y)
            stats = model.generator_step(x, y, net_optimizer=opt)
            assert bool(stats["finite"])
            grads[order] = flat([p.grad for p in model.generator_parameters()]).double()
        errs[dtype] = rel_err(grads["first"], grads["second"])
        assert errs[dtype] < tol, errs


def test_generator_step_accumulates_and_lr_argument():
    model = tiny_model()
    x, y = tiny_batch()
    model.generator_step(x, y, lr=0.1)
    g1 = flat([p.grad for p in model.generator_parameters()]).clone()
    model.generator_step(x, y, lr=0.1)
    assert torch.allclose(flat([p.grad for p in model.generator_parameters()]), 2 * g1)
    model.generator_step(x, y, lr=0.1, accumulate=False)
    assert torch.allclose(flat([p.grad for p in model.generator_parameters()]), g1)
    with pytest.raises(ValueError, match="lr"):
        model.generator_step(x, y)
    # grad_scale only rescales internally
    for p in model.generator_parameters():
        p.grad = None
    model.generator_step(x, y, lr=0.1, grad_scale=1024.0)
    assert torch.allclose(flat([p.grad for p in model.generator_parameters()]), g1, rtol=1e-9)


# ------------------------------------------------------------------------------ training behaviour


def clustered_problem(seed, n=256, c=4, d=8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def mlp_maxl(psi, d=8, width=32, entropy_weight=0.2, meta_order="second", seed=0):
    torch.manual_seed(seed)
    body = lambda: nn.Sequential(nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU())  # noqa: E731
    net = maxl_nets.MultiTaskNet(body(), width, len(psi), sum(psi))
    gen = maxl_nets.LabelGenerator(body(), width, psi, hidden=width)
    return mx.MaxlModel(net, mx.MaxlMethod(gen, psi, entropy_weight=entropy_weight, meta_order=meta_order))


def alternate(model, x, y, epochs, gen_lr, bs=64, seed=0):
    """One epoch of multi-task steps, then one epoch of generator steps (supplementary 5)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.multitask_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gopt = torch.optim.SGD(model.generator_parameters(), lr=gen_lr, weight_decay=5e-4)
    losses = []
    for _ in range(epochs):
        epoch_loss = 0.0
        for b in torch.randperm(len(y)).split(bs):
            total, _ = model.method.loss(model(x[b]), y[b])
            opt.zero_grad()
            total.backward()
            opt.step()
            epoch_loss += float(total.detach()) / (len(y) // bs)
        losses.append(epoch_loss)
        for b in torch.randperm(len(y)).split(bs):
            gopt.zero_grad()
            stats = model.generator_step(x[b], y[b], net_optimizer=opt)
            assert bool(stats["finite"])
            gopt.step()
    return losses


@pytest.mark.parametrize("meta_order", ["second", "first"])
def test_alternating_training_reduces_multitask_loss(meta_order):
    x, y = clustered_problem(0)
    model = mlp_maxl([5] * 4, meta_order=meta_order)
    losses = alternate(model, x, y, epochs=6, gen_lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(x)
    acc = (model.method.predict(out)["main"].argmax(1) == y).float().mean()
    assert acc > 0.8


def used_fraction(model, x, y):
    model.eval()
    with torch.no_grad():
        out = model(x)
        return maxl_losses.used_label_fraction(model.method.statistics(out, y)["label_counts"])


def test_entropy_term_increases_used_label_fraction():
    """Synthetic 4-class, psi = 5 each (20 auxiliary classes), 10 alternating epochs; generator
    lr 1.0 (the supplementary's 1e-3 is for 200 CIFAR epochs; this problem has 40 generator
    steps).  Measured: lambda = 0 stays at 0.55 (0.45 at init), lambda = 0.2 reaches 1.00."""
    x, y = clustered_problem(0)
    fractions = {}
    for lam in (0.0, 0.2):
        model = mlp_maxl([5] * 4, entropy_weight=lam)
        init = used_fraction(model, x, y)
        model.train()
        alternate(model, x, y, epochs=10, gen_lr=1.0)
        fractions[lam] = (init, used_fraction(model, x, y))
    assert fractions[0.2][1] > fractions[0.0][1], fractions
    assert fractions[0.2][1] >= 0.9, fractions


# ------------------------------------------------------------------------------ API / integration


def test_standalone_model_contract_and_parameter_split():
    model = tiny_model(dtype=torch.float32)
    x, y = tiny_batch(dtype=torch.float32)
    out = model(x)
    assert list(out) == ["main", "aux", "gen"] and not out["gen"].requires_grad
    total, parts = model.method.loss(out, y)
    assert set(parts) == {"focal/main", "focal/aux"} and torch.allclose(total, sum(parts.values()))
    rules = model.method.predict(out)
    for lp in rules.values():
        assert lp.shape == (16, 3) and torch.allclose(lp.exp().sum(1), torch.ones(16), atol=1e-5)
    metrics = model.method.extra_metrics(out, y)
    assert set(metrics) == {"aux_acc", "aux_in_set"} and all(m.dtype == torch.bool for m in metrics.values())
    total.backward()
    assert all(p.grad is None for p in model.generator_parameters())  # the multi-task step never trains it
    net_ids = {id(p) for p in model.multitask_parameters()}
    gen_ids = {id(p) for p in model.generator_parameters()}
    assert not net_ids & gen_ids and len(net_ids | gen_ids) == len(list(model.parameters()))
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    gen_names = {n for n, _ in model.named_parameters() if n.startswith("method.generator.")}
    assert gen_names and gen_names <= ignored
    assert not any(n.startswith("net.") for n in ignored)
    assert any(k.startswith("method.generator.") for k in model.state_dict())  # checkpoints hold both


def test_models_library_build_model_maxl(monkeypatch):
    base = pytest.importorskip("ssal_models.base")
    model_mod = pytest.importorskip("ssal_models.model")
    # registered for this test only (until ssal_models/__init__.py calls mx.register())
    monkeypatch.setitem(base.METHODS, "maxl", mx.build_maxl_method)
    with torch.device("meta"):  # the engine validates configs by building on the meta device
        meta_model = model_mod.build_model("resnet18", "maxl", 20, psi="cifar100:20-100")
        meta_out = meta_model.method.extra_outputs(torch.empty(2, 3, 32, 32), meta_model(torch.empty(2, 3, 32, 32)))
    assert {k: tuple(v.shape) for k, v in meta_out.items()} == {"main": (2, 20), "aux": (2, 100), "gen": (2, 100)}
    torch.manual_seed(0)
    model = model_mod.build_model("resnet18", "maxl", 4, psi=[2, 3, 1, 4], generator_arch="resnet10")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x)
    if "gen" not in out:  # until BranchedResNet.forward calls method.extra_outputs(x, outputs)
        out = model.method.extra_outputs(x, out)
    assert list(out)[:2] == ["main", "aux"] and out["aux"].shape == (4, 10) and out["gen"].shape == (4, 10)
    opt = torch.optim.SGD(mx.multitask_parameters(model), lr=0.1, momentum=0.9)
    total, _ = model.method.loss(out, y)
    total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for order in ("second", "first"):
        model.method.meta_order = order
        stats = model.method.generator_step(model, x, y, net_optimizer=opt, accumulate=False)
        assert bool(stats["finite"]) and all(p.grad is None for p in mx.multitask_parameters(model))
        assert all(p.grad is not None for p in mx.generator_parameters(model))
    names = mx.ddp_ignore_generator(model)
    assert names and all(n.startswith(("method.generator.", "method.collapse.")) for n in names)
    assert {"method.collapse.ema_label_sum", "method.collapse.ema_sample_count"} <= set(names)
    with pytest.raises(ValueError, match="unknown option"):
        model_mod.build_model("resnet18", "maxl", 4, bogus=1)
    with pytest.raises(ValueError, match="meta_order"):
        model_mod.build_model("resnet18", "maxl", 4, meta_order="third")


def test_register_is_idempotent_and_does_not_leak(monkeypatch):
    base = pytest.importorskip("ssal_models.base")
    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))  # a private copy of the registry
    mx.register()
    mx.register()
    assert base.METHODS["maxl"] is mx.build_maxl_method


@pytest.mark.parametrize("meta_order", ["second", "first"])
def test_generator_step_under_cpu_autocast(meta_order):
    """Meta step under autocast (Linear layers in bf16/fp16): finite, close to float32.
    Measured relative differences: second order 8e-3 (bf16) / 2e-3 (fp16), first 5e-2 / 1e-2."""
    model = tiny_model(meta_order=meta_order, dtype=torch.float32)
    x, y = tiny_batch(dtype=torch.float32)
    opt = stepped_optimizer(model, x, y)
    model.generator_step(x, y, net_optimizer=opt, accumulate=False)
    ref = flat([p.grad for p in model.generator_parameters()])
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            stats = model.generator_step(x, y, net_optimizer=opt, accumulate=False, grad_scale=256.0)
        assert bool(stats["finite"])
        assert rel_err(flat([p.grad for p in model.generator_parameters()]), ref) < 0.15
