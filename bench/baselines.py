"""Baselines the kernels are measured against (the fp64 reference is the third)."""
import torch

import anchor_kernels as ak


def eager_kspace(hidden, weight, prepared: ak.PreparedAnchors, config: ak.SteerConfig, bias=None):
    """A competent eager PyTorch version for one anchor set: gather the K rows, then T small
    matmuls in K-space with the cached Gram. ``hidden [B, d]``; every row uses set 0."""
    ids, w, gram = prepared.anchor_ids[0], prepared.anchor_weights[0], prepared.gram[0]
    rows = weight[ids].float()                                 # [K, d]
    h0 = hidden.float()
    z0 = h0 @ rows.T + (0 if bias is None else bias[ids].float())
    pos, neg = w > 0, w < 0
    log_w = torch.where(w != 0, w.abs(), 1.0).log()
    c = torch.zeros_like(z0)
    limit = config.max_norm_value * h0.norm(dim=-1, keepdim=True)
    for _ in range(config.steps):
        z = z0 + c @ gram
        if config.objective == "lse":
            a = z / config.temperature + log_w
            lse_p = torch.logsumexp(a.masked_fill(~pos, -torch.inf), -1, keepdim=True)
            lse_n = torch.logsumexp(a.masked_fill(~neg, -torch.inf), -1, keepdim=True)
            grad = torch.where(pos, (a - lse_p).exp(), 0) - torch.where(neg, (a - lse_n).exp(), 0)
            gap = config.temperature * (lse_p - lse_n)
        else:
            grad = w.expand_as(z)
            gap = (z * w).sum(-1, keepdim=True)
        active = torch.isfinite(gap) & (gap < config.margin_value)
        c = torch.where(active, c + config.step_size * (grad - config.reg * c), c)
        if config.max_norm is not None:
            q = ((c @ gram) * c).sum(-1, keepdim=True)
            c = torch.where(q > limit**2, c * limit / q.sqrt(), c)
    return (h0 + c @ rows).to(hidden.dtype)
