"""The literal definition of METHOD.md: the oracle every backend is tested against.

Full-vocabulary logits in fp64, autograd for grad G, a plain loop over steps, the trust region
applied in h-space. Slow on purpose: it shares nothing with the K-space kernels but the
definition.
"""
from __future__ import annotations

import torch

from .anchors import AnchorBank, AnchorSet
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


def _steer_rows_one_set(h0, weight, bias, anchors: AnchorSet, eta, config: SteerConfig):
    pos = torch.tensor(anchors.positive, device=h0.device)
    neg = torch.tensor(anchors.negative, device=h0.device)
    h = h0.clone()
    for _ in range(config.steps):
        x = h.detach().requires_grad_(True)
        logits = x @ weight.T                      # [b, V]: the whole vocabulary
        if bias is not None:
            logits = logits + bias
        gap = anchor_gap(logits[:, pos], logits[:, neg], anchors, config)
        (grad,) = torch.autograd.grad(gap.sum(), x)
        active = torch.isfinite(gap) & (gap < config.margin_value) & (eta != 0)
        step = eta[:, None] * (grad - config.reg * (h - h0))
        h = torch.where(active[:, None], h + step, h)
        if config.max_norm is not None:
            diff = h - h0
            norm = diff.norm(dim=-1)
            limit = config.max_norm * h0.norm(dim=-1)
            over = norm > limit
            h = torch.where(over[:, None], h0 + diff * (limit / norm)[:, None], h)
    return h


def steer_rows_fp64(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    anchors: AnchorBank, row_sets: torch.Tensor, step_size: torch.Tensor,
                    config: SteerConfig) -> torch.Tensor:
    """``hidden [B, d]`` -> steered ``[B, d]`` in fp64 (rows with ``row_sets == -1`` unchanged)."""
    h0 = hidden.detach().double()
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    out = h0.clone()
    with torch.enable_grad():
        for index, anchor_set in enumerate(anchors.sets):
            rows = (row_sets == index).nonzero().flatten()
            if rows.numel():
                out[rows] = _steer_rows_one_set(h0[rows], w, b, anchor_set,
                                                step_size[rows].double(), config)
    return out
