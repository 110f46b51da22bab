"""MAXL's meta step: the generator's gradient through a virtual SGD step of the multi-task net.

The forms (second order, and first order by central finite differences) are stated in
``ssal_models/maxl.py``'s docstring ("Meta step").  :class:`MetaStep` is a mixin of
:class:`ssal_models.maxl.MaxlMethod`, apart because it is the one part of the method that
differentiates through the net's own training step; it uses the method's ``generator``,
``multitask_loss``, ``collapse`` (``ssal_models.maxl_labels``), ``gamma``, ``entropy_weight``,
``fd_eps``, ``meta_order`` (:data:`META_ORDERS`) and sets its ``_in_meta`` flag around the
functional forwards (the model's forward then skips the generator's outputs).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .maxl_labels import Gather
from .maxl_losses import at_least_float32, focal_loss
from .maxl_nets import unwrap

__all__ = ["META_ORDERS", "MetaStep"]

META_ORDERS = ("second", "first")


def _set_train(module: nn.Module, mode: bool) -> Dict[nn.Module, bool]:
    old = {m: m.training for m in module.modules()}
    module.train(mode)
    return old


def _restore_train(old: Dict[nn.Module, bool]) -> None:
    for m, t in old.items():
        m.training = t


class MetaStep:
    """The generator's meta step (mixed into ``MaxlMethod``; see the module docstring)."""

    def _inner_hparams(self, net: nn.Module, lr: Optional[float], optimizer: Optional[torch.optim.Optimizer]):
        """name -> (lr, weight_decay, momentum * buffer or None) for the virtual SGD step, for
        every trainable parameter of ``net`` that is not the generator's."""
        by_param = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    mom = group.get("momentum", 0.0) or 0.0
                    buf = optimizer.state.get(p, {}).get("momentum_buffer") if mom else None
                    by_param[p] = (float(group["lr"]) if lr is None else float(lr),
                                   float(group.get("weight_decay", 0.0) or 0.0),
                                   None if buf is None else (mom * buf).detach())
        elif lr is None:
            raise ValueError("generator_step needs lr= or net_optimizer=")
        hp = {}
        gen_ids = {id(p) for p in self.generator.parameters()}
        for n, p in net.named_parameters():
            if p.requires_grad and id(p) not in gen_ids:
                hp[n] = by_param.get(p, (float(lr) if lr is not None else 0.0, 0.0, None))
        return hp

    @staticmethod
    def _step(theta: torch.Tensor, grad: Optional[torch.Tensor], hp) -> torch.Tensor:
        lr, wd, mbuf = hp
        d = torch.zeros_like(theta) if grad is None else grad
        if wd:
            d = d + wd * theta
        if mbuf is not None:
            d = d + mbuf
        return theta - lr * d

    def _fwd(self, net: nn.Module, params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor], x):
        self._in_meta = True
        try:
            return functional_call(net, (params, buffers), (x,), strict=False)
        finally:
            self._in_meta = False

    def meta_objective(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
                       net_optimizer: Optional[torch.optim.Optimizer] = None, grad_scale: float = 1.0,
                       gather: Optional[Gather] = None, update: bool = True):
        """Second order: ``(L_pri(theta+), H)`` as differentiable functions of the generator's
        parameters (``theta+`` built with ``create_graph=True``).  ``net`` is put in train
        mode for the call (BN batch statistics) and its buffers are not modified.  ``H`` is the
        configured collapse estimate (``gather``: see :class:`CollapseRegulariser`)."""
        return self._second_order(net, x, y, lr, net_optimizer, grad_scale, gather, update)[:2]

    def _second_order(self, net, x, y, lr, net_optimizer, grad_scale, gather, update=True):
        """(meta loss, H, generated log-probs, (L_pri, L_aux) at theta)."""
        hp = self._inner_hparams(net, lr, net_optimizer)
        params = {n: p for n, p in net.named_parameters() if n in hp}
        old = _set_train(net, True)
        try:
            buffers = {n: b.clone() for n, b in net.named_buffers()}
            gen_lp = self.generator.log_probs(x, y)
            out = self._fwd(net, params, buffers, x)
            pri, aux = self.multitask_loss(out, y, gen_lp.exp())
            names = list(params)
            grads = torch.autograd.grad((pri + aux) * grad_scale, [params[n] for n in names],
                                        create_graph=True, allow_unused=True)
            fast = {n: self._step(params[n], None if g is None else g / grad_scale, hp[n])
                    for n, g in zip(names, grads)}
            out2 = self._fwd(net, fast, buffers, x)
            meta = focal_loss(F.log_softmax(at_least_float32(out2["main"]), -1), y, self.gamma)
        finally:
            _restore_train(old)
        return meta, self.collapse(gen_lp, gather, update), gen_lp, (pri, aux)

    def _first_order(self, net, x, y, lr, net_optimizer, grad_scale, gather=None):
        """Finite-difference meta-gradient; returns (meta loss, H, surrogate, generated
        log-probs, (L_pri, L_aux) at theta) where ``grad_phi surrogate`` is the meta-gradient."""
        hp = self._inner_hparams(net, lr, net_optimizer)
        names = [n for n, p in net.named_parameters() if n in hp]
        theta = {n: p.detach() for n, p in net.named_parameters() if n in hp}
        old = _set_train(net, True)
        try:
            buffers = {n: b.clone() for n, b in net.named_buffers()}
            gen_lp = self.generator.log_probs(x, y)
            p = gen_lp.exp()
            pt = p.detach()

            def grads_wrt(params, target, wrt, parts=None):
                out = self._fwd(net, params, buffers, x)
                pri, aux = self.multitask_loss(out, y, target)
                if parts is not None:
                    parts.extend([pri.detach(), aux.detach()])
                g = torch.autograd.grad((pri + aux) * grad_scale, wrt, allow_unused=True)
                return [None if t is None else t / grad_scale for t in g]

            # virtual step theta+ (no graph)
            th = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            parts: list = []
            g = grads_wrt(th, pt, [th[n] for n in names], parts)
            with torch.no_grad():
                fast = {n: self._step(theta[n], gi, hp[n]).requires_grad_(True) for n, gi in zip(names, g)}
            out2 = self._fwd(net, fast, buffers, x)
            meta = focal_loss(F.log_softmax(at_least_float32(out2["main"]), -1), y, self.gamma)
            d = torch.autograd.grad(meta * grad_scale, [fast[n] for n in names], allow_unused=True)
            # u = lr * dL_pri/dtheta+  (per parameter lr); d theta+/d p = -lr * d^2 L / dtheta dp
            u = {n: (torch.zeros_like(theta[n]) if di is None else di / grad_scale) * hp[n][0]
                 for n, di in zip(names, d)}
            norm = torch.sqrt(sum((v.double() ** 2).sum() for v in u.values()))
            if float(norm) > 0 and torch.isfinite(norm):
                eps = self.fd_eps / float(norm)
                gp = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        th = {n: theta[n] + sign * eps * u[n] for n in names}
                    leaf = pt.clone().requires_grad_(True)
                    gp.append(grads_wrt(th, leaf, [leaf])[0])
                v = -(gp[0] - gp[1]) / (2.0 * eps)
            elif torch.isfinite(norm):
                v = torch.zeros_like(pt)
            else:  # dL_pri/dtheta+ overflowed (fp16): the meta-gradient is unknown, not zero
                v = torch.full_like(pt, float("nan"))
        finally:
            _restore_train(old)
        h = self.collapse(gen_lp, gather)
        surrogate = (p * v.detach()).sum() + self.entropy_weight * h
        return meta.detach(), h, surrogate, gen_lp, tuple(parts)

    def generator_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
                       net_optimizer: Optional[torch.optim.Optimizer] = None, grad_scale: float = 1.0,
                       accumulate: bool = True, gather: Optional[Gather] = None) -> Dict[str, torch.Tensor]:
        """Meta-gradient of ``L_pri(theta+) + lambda * H`` w.r.t. the generator, added to
        (``accumulate``) or written into the generator parameters' ``.grad``.

        Does not step any optimiser and leaves ``net`` (parameters, ``.grad``, BN buffers)
        untouched; advances the collapse estimate's running state (``ema``).  ``gather``: the
        all-gather of a multi-process run (``global`` / ``ema``; see the module docstring).
        Returns detached tensors: ``meta_loss``, ``entropy_term`` (the estimate's ``H``),
        ``finite``, ``gen_log_probs`` (the labels of this batch before the step) and
        ``focal/main``, ``focal/aux`` (the multi-task losses at the current ``theta``).
        """
        net = unwrap(net)
        gparams = [p for p in self.generator.parameters() if p.requires_grad]
        if self.meta_order == "second":
            # the double backward multiplies the inner (create_graph) and the outer gradient's
            # scales: sqrt(s) each keeps the product at s, the scale the GradScaler found safe for
            # the net's own backward (s each gives s^2: inf in fp16 at any usual scale)
            grad_scale = grad_scale ** 0.5
            meta, h, gen_lp, parts = self._second_order(net, x, y, lr, net_optimizer, grad_scale, gather)
            total = meta + self.entropy_weight * h
        else:
            meta, h, total, gen_lp, parts = self._first_order(net, x, y, lr, net_optimizer, grad_scale, gather)
        grads = torch.autograd.grad(total * grad_scale, gparams, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g / grad_scale for p, g in zip(gparams, grads)]
        # a non-finite meta loss counts too: the first-order path then drops its meta part (v = 0)
        # and would step on the entropy term alone
        finite = torch.stack([torch.isfinite(g).all() for g in grads] + [torch.isfinite(meta).all()]).all()
        if bool(finite):
            for p, g in zip(gparams, grads):
                if accumulate and p.grad is not None:
                    p.grad.add_(g)
                else:
                    p.grad = g.detach().clone()
        return {"meta_loss": meta.detach(), "entropy_term": h.detach(), "finite": finite,
                "gen_log_probs": gen_lp.detach(), "focal/main": parts[0].detach(), "focal/aux": parts[1].detach()}
