"""Triton backend: the whole steering edit in one launch, registered as a torch op.

Grid = (row tiles, anchor sets). Program (t, s) serves the rows of tile t whose set is s, so
``tl.dot`` sees one W_A per program while a mixed bank is still a single launch; rows of
other sets cost it one masked load of row_sets. Program (t, 0) also copies the rows that no set
claims (row_sets = -1 or out of range). Limits: K <= MAX_SET_SIZE; any d (tiled by BLOCK_D).
Up to IN_REGISTER_SET_SIZE the fp32 Gram of a set stays in the program for all steps; past it,
each step computes Gm c in chunks of GRAM_CHUNK columns through a per-row fp32 scratch of c.
"""
from __future__ import annotations

from typing import Optional

import torch


MAX_SET_SIZE = 256
IN_REGISTER_SET_SIZE = 128
GRAM_CHUNK = 32
BLOCK_ROWS = 16  # tl.dot needs M >= 16

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:
    triton = tl = None
    IMPORT_ERROR = exc

if IMPORT_ERROR is None:

    @triton.jit
    def _steer_hidden_kernel(
        hidden_ptr, weight_ptr, bias_ptr, ids_ptr, aw_ptr, gram_ptr, row_sets_ptr, eta_ptr,
        out_ptr, scratch_ptr, rows, dim, num_sets, set_size, hidden_row_stride, weight_row_stride,
        out_row_stride, steps, reg, tau, margin, max_norm,
        LSE: tl.constexpr, TRUST: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        CHUNKED: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """out[r] = h0 + W_A^T c_T for rows r of this tile using set s (METHOD.md, K-space):
        z0 = W_A h0 + b_A; each step z = z0 + Gm c, c += eta m (s(z) - reg c), trust region
        on c^T Gm c. Gm c is carried across steps so a step is one K x K dot."""
        tile = tl.program_id(0)
        s = tl.program_id(1)
        r = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        in_range = r < rows
        rs = tl.load(row_sets_ptr + r, mask=in_range, other=-1)
        unclaimed = (rs < 0) | (rs >= num_sets)
        mine = in_range & (rs == s)
        store = mine | (in_range & unclaimed & (tl.zeros((BLOCK_B,), dtype=tl.int32) + s == 0))
        if tl.sum(store.to(tl.int32), axis=0) > 0:
            k = tl.arange(0, BLOCK_K)
            k_ok = k < set_size
            ids = tl.load(ids_ptr + s * set_size + k, mask=k_ok, other=0)
            w = tl.load(aw_ptr + s * set_size + k, mask=k_ok, other=0.0)
            live = w != 0.0
            eta = tl.load(eta_ptr + r, mask=mine, other=0.0)

            # z0 = W_A h0 (+ b_A) and ||h0||, one pass over d.
            z0 = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            h_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < dim
                h = tl.load(hidden_ptr + r[:, None] * hidden_row_stride + dd[None, :],
                            mask=mine[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                wa = tl.load(weight_ptr + ids[:, None] * weight_row_stride + dd[None, :],
                             mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                z0 += tl.dot(h, tl.trans(wa), input_precision="ieee")
                h_sq += tl.sum(h * h, axis=1)
            if HAS_BIAS:
                z0 += tl.load(bias_ptr + ids, mask=live, other=0.0).to(tl.float32)[None, :]
            limit = max_norm * tl.sqrt(h_sq)

            gram_base = gram_ptr + s * set_size * set_size
            if not CHUNKED:  # gram_t[j, i] = Gm[i, j], held for all steps
                gram_t = tl.load(gram_base + k[None, :] * set_size + k[:, None],
                                 mask=k_ok[:, None] & k_ok[None, :], other=0.0)
            log_w = tl.log(tl.where(live, tl.abs(w), 1.0))
            pos = (w > 0.0)[None, :]
            neg = (w < 0.0)[None, :]
            c = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            gc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            for _ in range(steps):
                z = z0 + gc
                if LSE:
                    a = z / tau + log_w[None, :]
                    a_pos = tl.where(pos, a, float("-inf"))
                    a_neg = tl.where(neg, a, float("-inf"))
                    m_pos = tl.max(a_pos, axis=1)
                    m_neg = tl.max(a_neg, axis=1)
                    e_pos = tl.where(pos, tl.exp(a_pos - m_pos[:, None]), 0.0)
                    e_neg = tl.where(neg, tl.exp(a_neg - m_neg[:, None]), 0.0)
                    sum_pos = tl.sum(e_pos, axis=1)
                    sum_neg = tl.sum(e_neg, axis=1)
                    grad = e_pos / sum_pos[:, None] - e_neg / sum_neg[:, None]
                    gap = tau * ((m_pos + tl.log(sum_pos)) - (m_neg + tl.log(sum_neg)))
                else:
                    grad = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32) + w[None, :]
                    gap = tl.sum(grad * z, axis=1)
                # A non-finite gap (non-finite hidden row) freezes the row.
                finite = (gap == gap) & (tl.abs(gap) < float("inf"))
                active = mine & finite & (gap < margin)
                c = tl.where(active[:, None], c + eta[:, None] * (grad - reg * c), c)
                if CHUNKED:
                    # Rows are this program's alone (one set per row): no other program touches them.
                    row_scratch = scratch_ptr + r[:, None] * BLOCK_K
                    tl.store(row_scratch + k[None, :], c, mask=mine[:, None])
                    tl.debug_barrier()
                    gc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
                    for j0 in tl.static_range(0, BLOCK_K, CHUNK):
                        jj = j0 + tl.arange(0, CHUNK)
                        c_part = tl.load(row_scratch + jj[None, :], mask=mine[:, None], other=0.0)
                        g_part = tl.load(gram_base + k[None, :] * set_size + jj[:, None],
                                         mask=(jj < set_size)[:, None] & k_ok[None, :], other=0.0)
                        gc += tl.dot(c_part, g_part, input_precision="ieee")
                    tl.debug_barrier()  # all reads done before the next step overwrites c
                else:
                    gc = tl.dot(c, gram_t, input_precision="ieee")
                if TRUST:
                    q = tl.sum(c * gc, axis=1)
                    scale = tl.where(q > limit * limit, limit / tl.sqrt(q), 1.0)
                    c = c * scale[:, None]
                    gc = gc * scale[:, None]

            moved = tl.sum((c != 0.0).to(tl.int32), axis=1) > 0
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < dim
                h = tl.load(hidden_ptr + r[:, None] * hidden_row_stride + dd[None, :],
                            mask=store[:, None] & d_ok[None, :], other=0.0)
                wa = tl.load(weight_ptr + ids[:, None] * weight_row_stride + dd[None, :],
                             mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                delta = tl.dot(c, wa, input_precision="ieee")
                new = (h.to(tl.float32) + delta).to(h.dtype)
                tl.store(out_ptr + r[:, None] * out_row_stride + dd[None, :],
                         tl.where(moved[:, None], new, h), mask=store[:, None] & d_ok[None, :])

    def _check(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size):
        dev = hidden.device
        torch._check(hidden.dim() == 2, lambda: f"steer_hidden: hidden must be 2-D [B, d], got {tuple(hidden.shape)}")
        torch._check(hidden.dtype in (torch.float32, torch.float16, torch.bfloat16),
                     lambda: f"steer_hidden: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
        for name, t, dtype, dims in (("weight", weight, hidden.dtype, 2), ("anchor_ids", anchor_ids, torch.long, 2),
                                     ("anchor_weights", anchor_weights, torch.float32, 2),
                                     ("gram", gram, torch.float32, 3), ("row_sets", row_sets, torch.long, 1),
                                     ("step_size", step_size, torch.float32, 1)):
            torch._check(t.dim() == dims and t.dtype == dtype and t.device == dev,
                         lambda: f"steer_hidden: {name} must be a {dims}-D {dtype} tensor on {dev}, got "
                                 f"{t.dim()}-D {t.dtype} on {t.device}")
        S, K = anchor_ids.shape
        torch._check(weight.shape[1] == hidden.shape[1], lambda: "steer_hidden: weight must be [V, d] with hidden's d")
        torch._check(tuple(anchor_weights.shape) == (S, K) and tuple(gram.shape) == (S, K, K),
                     lambda: "steer_hidden: anchor_weights must be [S, K] and gram [S, K, K] like anchor_ids")
        torch._check(row_sets.shape[0] == hidden.shape[0] and step_size.shape[0] == hidden.shape[0],
                     lambda: "steer_hidden: row_sets and step_size need one entry per row of hidden")
        torch._check(K <= MAX_SET_SIZE, lambda: f"steer_hidden: the triton backend supports anchor sets of at most "
                                                 f"{MAX_SET_SIZE} tokens, got K = {K}; use backend='cuda' or 'cpu'")
        if bias is not None:
            torch._check(bias.shape == (weight.shape[0],) and bias.dtype == hidden.dtype and bias.device == dev,
                         lambda: "steer_hidden: bias must be [V] with hidden's dtype and device")

    # The schema is inferred from these annotations (triton_op ignores schema=); a test holds
    # it equal to the C++ declaration in csrc/ops.cpp.
    @torch.library.triton_op("anchor_kernels::steer_hidden_triton", mutates_args=())
    def steer_hidden_triton(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        anchor_ids: torch.Tensor, anchor_weights: torch.Tensor, gram: torch.Tensor,
        row_sets: torch.Tensor, step_size: torch.Tensor, steps: int, objective: str, reg: float,
        temperature: float, margin: float, max_norm: float,
    ) -> torch.Tensor:
        _check(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size)
        torch._check(objective in ("mean", "lse"), lambda: f"steer_hidden: objective must be 'mean' or 'lse', got {objective!r}")
        torch._check(steps >= 0 and reg >= 0 and temperature > 0 and max_norm >= 0,
                     lambda: "steer_hidden: needs steps >= 0, reg >= 0, temperature > 0, max_norm >= 0")
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        if weight.stride(-1) != 1:
            weight = weight.contiguous()
        out = hidden.new_empty(hidden.shape)
        rows, dim = hidden.shape
        S, K = anchor_ids.shape
        if rows == 0:
            return out
        grid = (triton.cdiv(rows, BLOCK_ROWS), S)
        block_k = max(16, triton.next_power_of_2(K))
        chunked = block_k > IN_REGISTER_SET_SIZE
        scratch = hidden.new_empty((rows, block_k) if chunked else (1, 1), dtype=torch.float32)
        torch.library.wrap_triton(_steer_hidden_kernel)[grid](
            hidden, weight, weight if bias is None else bias, anchor_ids.contiguous(),
            anchor_weights.contiguous(), gram.contiguous(), row_sets.contiguous(),
            step_size.contiguous(), out, scratch, rows, dim, S, K, hidden.stride(0), weight.stride(0),
            out.stride(0), steps, reg, temperature, margin, max_norm,
            LSE=objective == "lse", TRUST=max_norm != float("inf"), HAS_BIAS=bias is not None,
            BLOCK_B=BLOCK_ROWS, BLOCK_K=block_k, BLOCK_D=min(128, max(16, triton.next_power_of_2(dim))),
            CHUNKED=chunked, CHUNK=GRAM_CHUNK,
        )
        return out
