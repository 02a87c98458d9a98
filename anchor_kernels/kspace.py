"""The K-space loop of METHOD.md in eager PyTorch, from anchor logits alone.

This is what engines that only expose logits need (see logits.py). It works on any device and
any batch of bank rows. The fused kernels do the same maths in one launch.
"""
from __future__ import annotations

import torch

from .anchors import PreparedAnchors
from .config import SteerConfig


def solve_coefficients(z0: torch.Tensor, prepared: PreparedAnchors, row_sets: torch.Tensor,
                       step_size: torch.Tensor, config: SteerConfig,
                       hidden_norm: torch.Tensor | None = None) -> torch.Tensor:
    """c_T such that h' = h0 + W_A^T c_T, from ``z0 [B, K]`` (the anchor logits of each row's set).

    row_sets [B] (-1 or out of range: c = 0), step_size [B]. The trust region needs
    ``hidden_norm [B]`` (= ||h0||).
    """
    num_sets = prepared.anchor_ids.shape[0]
    valid = (row_sets >= 0) & (row_sets < num_sets)
    rs = torch.where(valid, row_sets, 0)
    w = prepared.anchor_weights[rs]                      # [B, K]
    # Gm c per row against each set's shared Gram: S small matmuls, no [B, K, K] gather.
    in_set = [(row_sets == s).unsqueeze(-1) for s in range(num_sets)]
    pos, neg = w > 0, w < 0
    log_w = torch.where(w != 0, w.abs(), 1.0).log()
    z0 = z0.float()
    eta = step_size.float()[:, None]
    c = torch.zeros_like(z0)
    gc = torch.zeros_like(z0)                            # Gm c, carried across steps
    if config.max_norm is not None:
        if hidden_norm is None:
            raise ValueError("max_norm (the trust region) needs ||h0||, which logits do not carry: "
                             "pass hidden_norm or steer the hidden state instead")
        limit = config.max_norm * hidden_norm.float()
    for _ in range(config.steps):
        z = z0 + gc
        if config.objective == "lse":
            tau = config.temperature
            a = z / tau + log_w
            lse_p = torch.logsumexp(a.masked_fill(~pos, -torch.inf), -1, keepdim=True)
            lse_n = torch.logsumexp(a.masked_fill(~neg, -torch.inf), -1, keepdim=True)
            grad = torch.where(pos, (a - lse_p).exp(), 0.0) - torch.where(neg, (a - lse_n).exp(), 0.0)
            gap = tau * (lse_p - lse_n).squeeze(-1)
        else:
            grad = w
            gap = (w * z).sum(-1)
        active = valid & torch.isfinite(gap) & (gap < config.margin_value)
        c = torch.where(active[:, None], c + eta * (grad - config.reg * c), c)
        gc = sum(torch.where(mask, c @ prepared.gram[s], 0.0) for s, mask in enumerate(in_set))
        if config.max_norm is not None:
            q = (c * gc).sum(-1)
            scale = torch.where(q > limit * limit, limit / q.sqrt(), 1.0)[:, None]
            c, gc = c * scale, gc * scale
    return c
