"""The K-space loop of METHOD.md in eager PyTorch.

Two users: engines that only expose logits (``solve_coefficients``, from anchor logits alone;
see logits.py), and the ops' backward (``steer_rows_differentiable``: the whole edit from h0
and W, differentiable by autograd). The fused kernels do the same maths in one launch.
"""
from __future__ import annotations

from typing import Callable

import torch

from .anchors import PreparedAnchors, gram_diag_ok
from .config import FP32_MAX, SteerConfig


def _gap_and_grad(z: torch.Tensor, w: torch.Tensor, config: SteerConfig):
    """G per row and s = dG/dz (padding, w = 0: s = 0) for signed anchor weights ``w``; every
    row needs a positive and a negative anchor. Masked with -inf before exp, so autograd never
    meets 0 * inf."""
    if config.objective == "mean":
        return (w * z).sum(-1), w.expand_as(z)
    tau = config.temperature
    a = z / tau + torch.where(w != 0, w.abs(), 1.0).log()
    a_pos = a.masked_fill(~(w > 0), -torch.inf)
    a_neg = a.masked_fill(~(w < 0), -torch.inf)
    lse_p = torch.logsumexp(a_pos, -1, keepdim=True)
    lse_n = torch.logsumexp(a_neg, -1, keepdim=True)
    grad = (a_pos - lse_p).exp() - (a_neg - lse_n).exp()
    return tau * (lse_p - lse_n).squeeze(-1), grad


def require_hidden_norm(config: SteerConfig, hidden_norm) -> None:
    """The trust region and the relative step need ||h0||, which logits alone do not carry."""
    if hidden_norm is None and (config.max_norm is not None or config.relative_step):
        raise ValueError("max_norm (the trust region) and the relative step (SteerConfig strength=) need "
                         "||h0||, which logits do not carry: pass hidden_norm, use SteerConfig(eta=...) "
                         "(METHOD.md's literal step) without max_norm, or steer the hidden state instead")


def robust_norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| over the last dim, as the kernels compute ||h0|| (csrc/kernels/fp_range.h): rows whose
    fp32 sum of squares leaves [2^-64, FLT_MAX] (entries near 1e-20 or 1e20) are recomputed scaled
    by 2^64 or 2^-80 before squaring, where torch's norm would give 0 or inf. Differentiable."""
    sq = (x.detach() * x.detach()).sum(-1)
    small = sq < 2.0**-64
    # 1 where the plain sum is in range: the same value and derivatives as x.norm() there
    f = torch.where(small, 2.0**64, torch.where(sq <= FP32_MAX, 1.0, 2.0**-80))
    return (x * f.unsqueeze(-1)).norm(dim=-1) / f


def _scaled(v: torch.Tensor, size_bits: int):
    """``v`` times 2^-x per row, and 2^-x, 2^x: fp_range.h's quadratic_exponent (max |v| < 2^-size_bits
    after scaling), so that no partial sum of Gm v or v . Gm v leaves fp32's range. The power of two
    is detached: it scales exactly and carries no gradient."""
    _, e = torch.frexp(v.detach().abs().amax(-1))
    x = e.clamp(-100, 100) + size_bits
    one = torch.ones_like(v[..., 0])
    down = torch.ldexp(one, -x)
    return v * down.unsqueeze(-1), down, torch.ldexp(one, x)


def kspace_loop(z0: torch.Tensor, w: torch.Tensor, gram_times: Callable[[torch.Tensor], torch.Tensor],
                eta: torch.Tensor, valid: torch.Tensor, config: SteerConfig,
                hidden_norm: torch.Tensor | None, gram_diag: torch.Tensor | None = None) -> torch.Tensor:
    """c_T for rows with anchor logits ``z0 [B, K]``, signed weights ``w [B, K]``, per-row
    ``eta [B]`` and ``gram_times(c) = Gm c`` per row. Rows where ``valid`` is False get c = 0.
    ``hidden_norm`` (= ||h0||) is needed by the trust region and by the relative step (``strength``).
    ``gram_diag [B, K]`` (each row's ||W_a||^2) bounds the edit's terms: as the kernels, a row whose
    c is not finite or whose sum_k |c_k| ||W_a_k|| passes FLT_MAX gets c = 0 (issue 20, item 6).
    The quadratic forms (||grad G(h0)||, ||h - h0||) are of vectors scaled by powers of two first, as
    in the kernels (issue 20, items 6 and 9)."""
    require_hidden_norm(config, hidden_norm)
    size_bits = max(z0.shape[-1] - 1, 0).bit_length()
    # As the kernels: a step that is not finite and > 0, or (where ||h0|| is used) a norm that is
    # not finite and >= 0, leaves its row untouched (per-row values are not always host-checked).
    usable = (eta > 0) & torch.isfinite(eta)
    if config.max_norm is not None or config.relative_step:
        usable &= (hidden_norm >= 0) & torch.isfinite(hidden_norm)
    eta = torch.where(usable, eta, 0.0)[:, None]
    if config.relative_step:
        _, s0 = _gap_and_grad(z0, w, config)
        s0, down, _ = _scaled(s0, size_bits)
        g_sq = (s0 * gram_times(s0)).sum(-1, keepdim=True)        # ||grad G(h0)||^2 2^-2x
        ok = (g_sq > 0) & torch.isfinite(g_sq)
        # fp_range.h's relative_eta: ||h0|| 2^-x before the division where that loses no bits
        root, h, down = torch.where(ok, g_sq, 1.0).sqrt(), hidden_norm[:, None], down[:, None]
        eta = torch.where(ok, torch.where((h >= 1) & (down <= 1), eta * (h * down) / root, eta * h / root * down), 0.0)
        eta = torch.where(torch.isfinite(eta), eta, 0.0)
    limit = None if config.max_norm is None else config.max_norm * hidden_norm
    c = torch.zeros_like(z0)
    gc = torch.zeros_like(z0)                            # Gm c, carried across steps
    for _ in range(config.steps):
        gap, grad = _gap_and_grad(z0 + gc, w, config)
        active = valid & torch.isfinite(gap) & (gap < config.margin_value)
        c = torch.where(active[:, None], c + eta * (grad - config.reg * c), c)
        if limit is None:
            gc = gram_times(c)
        else:
            # ||h - h0|| 2^-x from c 2^-x: past the limit c is the scaled c times limit / ||.||,
            # else it is scaled back (exactly)
            c, down, up = _scaled(c, size_bits)
            gc = gram_times(c)
            q = (c * gc).sum(-1)
            n = torch.where(q > 0, q, 1.0).sqrt()
            over = (q > 0) & (n > limit * down)
            scale = torch.where(over, limit / n, up)[:, None]
            c, gc = c * scale, gc * scale
    if gram_diag is not None:
        with torch.no_grad():
            bound = torch.where(c != 0, c.abs() * gram_diag.clamp_min(0).sqrt(), 0.0).sum(-1)
        c = torch.where((bound <= FP32_MAX).unsqueeze(-1), c, 0.0)
    return c


def solve_coefficients(z0: torch.Tensor, prepared: PreparedAnchors, row_sets: torch.Tensor,
                       step_size: torch.Tensor, config: SteerConfig,
                       hidden_norm: torch.Tensor | None = None) -> torch.Tensor:
    """c_T such that h' = h0 + W_A^T c_T, from ``z0 [B, K]`` (the anchor logits of each row's set).

    row_sets [B] (-1 or out of range: c = 0), step_size [B], hidden_norm [B] (= ||h0||) for the
    trust region and the relative step (``strength``).
    """
    num_sets = prepared.anchor_ids.shape[0]
    # As the kernels: a set with a non-finite anchor row, or one whose squared norm the fp32 Gram
    # cannot hold (its Gram diagonal fails gram_diag_ok), cannot steer.
    diag = prepared.gram.diagonal(dim1=1, dim2=2)                            # [S, K]
    finite_set = (gram_diag_ok(diag) | (prepared.anchor_weights == 0)).all(-1)   # [S]
    valid = (row_sets >= 0) & (row_sets < num_sets)
    valid &= finite_set[torch.where(valid, row_sets, 0)]
    w = prepared.anchor_weights[torch.where(valid, row_sets, 0)]     # [B, K]
    # Gm c per row against each set's shared Gram: S small matmuls, no [B, K, K] gather.
    in_set = [(row_sets == s).unsqueeze(-1) for s in range(num_sets)]

    def gram_times(c):
        return sum(torch.where(mask, c @ prepared.gram[s], 0.0) for s, mask in enumerate(in_set))

    norm = None if hidden_norm is None else hidden_norm.float()
    return kspace_loop(z0.float(), w, gram_times, step_size.float(), valid, config, norm,
                       diag[torch.where(valid, row_sets, 0)])


def steer_rows_differentiable(hidden, weight, bias, anchor_ids, anchor_weights, row_sets, step_size,
                              config: SteerConfig) -> torch.Tensor:
    """The whole edit ``hidden [B, d] -> h'`` in eager torch (fp32), differentiable in hidden,
    weight and bias: what the ops' backward differentiates. Gathers [B, K, d] anchor rows, so
    it is for gradients, not for decoding."""
    num_sets = anchor_ids.shape[0]
    valid = (row_sets >= 0) & (row_sets < num_sets)
    rs = torch.where(valid, row_sets, 0)
    w = anchor_weights[rs].float()                                     # [B, K]
    live = (w != 0).unsqueeze(-1)
    rows = torch.where(live, weight[anchor_ids[rs]].float(), 0.0)        # [B, K, d]
    h0 = hidden.float()
    z0 = torch.einsum("bkd,bd->bk", rows, h0)
    if bias is not None:
        z0 = z0 + torch.where(live.squeeze(-1), bias[anchor_ids[rs]].float(), 0.0)
    gram = rows @ rows.transpose(1, 2)                                  # [B, K, K]
    diag = gram.diagonal(dim1=1, dim2=2)
    valid = valid & (gram_diag_ok(diag.detach()) | (w == 0)).all(-1)   # as the kernels (anchors.py)
    c = kspace_loop(z0, w, lambda v: (gram @ v.unsqueeze(-1)).squeeze(-1), step_size.float(),
                    valid & (step_size != 0), config, robust_norm(h0), diag)
    return h0 + torch.einsum("bk,bkd->bd", c, rows)
