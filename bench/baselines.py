"""Baselines the kernels are measured against (the fp64 reference is the third)."""
import torch

import anchor_kernels as ak
from anchor_kernels.kspace import solve_coefficients


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
