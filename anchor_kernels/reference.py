"""The literal definition of METHOD.md: the oracle every backend is tested against.

Full-vocabulary logits in fp64, autograd for grad G, a plain loop over steps, the trust region
applied in h-space. Slow on purpose: it shares nothing with the K-space kernels but the
definition. It is itself differentiable (create_graph), so it is also the oracle for the ops'
gradients.

G depends on the anchor rows of W only. A non-finite value in another row cannot change the
edit, but IEEE autograd of the full [b, V] logits would spread it (0 * NaN = NaN) into grad G,
so such rows are zeroed before the logits are formed: the oracle computes what the method
defines, and the kernels (which never read those rows) must match it.
"""
from __future__ import annotations

import torch

from .anchors import AnchorBank, AnchorSet, gram_diag_ok
from .config import SteerConfig


def anchor_gap(z_pos: torch.Tensor, z_neg: torch.Tensor, anchors: AnchorSet,
               config: SteerConfig) -> torch.Tensor:
    """G per row from positive ``[b, |P|]`` and negative ``[b, |N|]`` anchor logits."""
    alpha = z_pos.new_tensor(anchors.positive_weights)
    beta = z_neg.new_tensor(anchors.negative_weights)
    if config.objective == "mean":
        return z_pos @ alpha - z_neg @ beta
    tau = config.temperature
    return (tau * torch.logsumexp(z_pos / tau + alpha.log(), dim=-1)
            - tau * torch.logsumexp(z_neg / tau + beta.log(), dim=-1))


def _steer_rows_one_set(h0, weight, bias, anchors: AnchorSet, eta, config: SteerConfig,
                        create_graph: bool):
    rows_a = weight[list(anchors.ids)]
    if not bool(torch.isfinite(rows_a).all()) or not bool(gram_diag_ok(rows_a.pow(2).sum(-1).float()).all()):
        # a non-finite anchor row, or one whose squared norm the fp32 Gram cannot hold: no backend
        # steers with this set (anchors.py)
        return h0.clone()
    pos = torch.tensor(anchors.positive, device=h0.device)
    neg = torch.tensor(anchors.negative, device=h0.device)
    is_anchor = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    is_anchor[list(anchors.ids)] = True
    weight = torch.where(is_anchor[:, None] | torch.isfinite(weight), weight, 0.0)
    if bias is not None:
        bias = torch.where(is_anchor | torch.isfinite(bias), bias, 0.0)
    h = h0.clone()
    if config.relative_step:
        # eta is the fraction of ||h0|| the first step moves h: divide by ||grad G(h0)||.
        x = h if h.requires_grad else h.detach().requires_grad_(True)
        logits = x @ weight.T
        if bias is not None:
            logits = logits + bias
        gap = anchor_gap(logits[:, pos], logits[:, neg], anchors, config)
        (grad,) = torch.autograd.grad(gap.sum(), x, create_graph=create_graph)
        g_norm = grad.norm(dim=-1)
        ok = (g_norm > 0) & torch.isfinite(g_norm)
        eta = torch.where(ok, eta * h0.norm(dim=-1) / torch.where(ok, g_norm, 1.0), 0.0)
        eta = torch.where(torch.isfinite(eta), eta, 0.0)
    for _ in range(config.steps):
        x = h if h.requires_grad else h.detach().requires_grad_(True)
        logits = x @ weight.T                      # [b, V]: the whole vocabulary
        if bias is not None:
            logits = logits + bias
        gap = anchor_gap(logits[:, pos], logits[:, neg], anchors, config)
        (grad,) = torch.autograd.grad(gap.sum(), x, create_graph=create_graph)
        active = torch.isfinite(gap) & (gap < config.margin_value) & (eta != 0)
        step = eta[:, None] * (grad - config.reg * (h - h0))
        h = torch.where(active[:, None], h + step, h)
        if config.max_norm is not None:
            diff = h - h0
            norm = diff.norm(dim=-1)
            limit = config.max_norm * h0.norm(dim=-1)
            over = norm > limit
            h = torch.where(over[:, None], h0 + diff * (limit / torch.where(over, norm, 1.0))[:, None], h)
    return h


def steer_rows_fp64(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    anchors: AnchorBank, row_sets: torch.Tensor, step_size: torch.Tensor,
                    config: SteerConfig) -> torch.Tensor:
    """``hidden [B, d]`` -> steered ``[B, d]`` in fp64 (rows with ``row_sets == -1`` unchanged).

    Differentiable in hidden, weight and bias where they require grad (and grad mode is on)."""
    create_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not create_graph:
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    # Outside inference mode (grad G is computed with autograd, which inference mode disables),
    # on copies: an inference tensor cannot be saved for backward.
    with torch.inference_mode(False), torch.enable_grad():
        h0 = hidden.to(torch.float64, copy=True)
        w = weight.to(torch.float64, copy=True)
        b = None if bias is None else bias.to(torch.float64, copy=True)
        step_size, row_sets = step_size.clone(), row_sets.clone()
        out = h0.clone()
        for index, anchor_set in enumerate(anchors.sets):
            rows = (row_sets == index).nonzero().flatten()
            if rows.numel():
                out = out.index_put((rows,), _steer_rows_one_set(
                    h0[rows], w, b, anchor_set, step_size[rows].double(), config, create_graph))
    return out if create_graph else out.detach()
