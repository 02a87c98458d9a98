"""Baselines the kernels are measured against."""
import torch

import anchor_kernels as ak
from anchor_kernels.kspace import solve_coefficients
from anchor_kernels.reference import anchor_gap


def eager_kspace(hidden, weight, prepared: ak.PreparedAnchors, config: ak.SteerConfig, bias=None):
    """A competent eager PyTorch version: gather the K anchor rows, T small matmuls in K-space
    with the cached Gram, one more matmul for h'. ``hidden [B, d]``; every row uses set 0."""
    ids = prepared.anchor_ids[0]
    rows = weight[ids].float()                                 # [K, d]
    h0 = hidden.float()
    z0 = h0 @ rows.T + (0 if bias is None else bias[ids].float())
    batch = hidden.shape[0]
    c = solve_coefficients(z0, prepared, torch.zeros(batch, dtype=torch.long, device=hidden.device),
                           torch.full((batch,), config.step_size, device=hidden.device), config,
                           hidden_norm=h0.norm(dim=-1))
    return (h0 + c @ rows).to(hidden.dtype)


def literal_autograd(hidden, weight, anchors: ak.AnchorSet, config: ak.SteerConfig, bias=None):
    """Prior work's approach, in the model's dtype: at every step a full-vocabulary LM-head
    forward and an autograd backward (T passes over the [V, d] head). The step is the config's:
    ``eta`` as is, or ``strength`` turned into eta_row = strength ||h0|| / ||grad G(h0)|| from
    the first step's gradient (no extra pass)."""
    pos = torch.tensor(anchors.positive, device=hidden.device)
    neg = torch.tensor(anchors.negative, device=hidden.device)
    h0 = hidden.detach()
    h = h0.clone()
    eta = config.step_size
    with torch.enable_grad():
        for k in range(config.steps):
            x = h.detach().requires_grad_(True)
            logits = torch.nn.functional.linear(x, weight, bias).float()   # [B, V]
            gap = anchor_gap(logits[:, pos], logits[:, neg], anchors, config)
            (grad,) = torch.autograd.grad(gap.sum(), x)
            if k == 0 and config.relative_step:
                norm = grad.float().norm(dim=-1, keepdim=True)
                eta = torch.where(norm > 0, config.strength * h0.float().norm(dim=-1, keepdim=True) / norm, 0.0)
                eta = eta.to(h.dtype)
            h = (h + eta * (grad - config.reg * (h - h0))).detach()
    return h
