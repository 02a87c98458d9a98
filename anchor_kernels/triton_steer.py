"""Triton backend: the whole steering edit in one launch, registered as a torch op.

Grid = row tiles x anchor sets, flattened to one axis (no 65,535 limit on either). Program
(t, s) serves the rows of tile t whose set is s, so ``tl.dot`` sees one W_A per program while
a mixed bank is still a single launch; rows of other sets cost it one masked load of row_sets,
and a tile with no row of set s does nothing more. Program (t, 0) also copies the rows that no
set claims (row_sets = -1 or out of range). Limits: K <= MAX_SET_SIZE; any d (tiled by BLOCK_D).
Up to IN_REGISTER_SET_SIZE the fp32 Gram of a set stays in the program for all steps; past it,
each step computes Gm c in chunks of GRAM_CHUNK columns through a per-row fp32 scratch of c.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from .anchors import GRAM_DIAG_MIN, gram_diag_ok
from .config import FP32_MAX, MAX_STEPS, MIN_TEMPERATURE, MAX_TEMPERATURE


MAX_SET_SIZE = 256
IN_REGISTER_SET_SIZE = 128
GRAM_CHUNK = 32
BLOCK_ROWS = 16  # tl.dot needs M >= 16
# Software-pipelining stages of every launch: Triton's default (3) takes up to twice the shared
# memory (as launched at B = 8, d = 4096 on sm_90a: bf16 K = 16 8,192 B against 6,144 B, fp32
# K = 64 45,056 B against 28,672 B) for no fewer spills (none either way in Triton's own cubins
# up to K = 64; the 8-16 B once blamed on 3 stages were a plain ptxas -v's). Which is faster is
# for `make gpu-check` to measure. The AOT check compiles with the same value.
NUM_STAGES = 2

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:
    triton = tl = None
    IMPORT_ERROR = exc


def launch_config(set_size: int, dim: int, fp32: bool) -> dict:
    """The compile-time configuration the launcher picks for a set size K, a width d and the
    input dtype (fp32 or 16-bit).

    One place, used by the launcher and by the ahead-of-time compile check
    (``python -m anchor_kernels.aot``), so what CI compiles is what runs. Chosen from that check's
    reports of the cubins Triton builds (sm_80 and sm_90a, every flag on and each off): the
    [BLOCK_K, BLOCK_D] anchor tile shrinks as K grows, and for fp32 (3xTF32 dots hold three
    operand splits), so that K <= 128 compiles with no register spills (but fp32 K = 128 on
    sm_90a: 16-40 B, aot.local_budget) and every tile fits the 99 KiB of shared memory of
    sm_86/sm_89. The chunked K = 256 path spills up to 2 KiB per thread. 16-bit K <= 32 tiles
    were 128 wide until the check read Triton's own cubins: those spilled 16-48 B.
    """
    block_k = max(16, 1 << (set_size - 1).bit_length())
    if block_k > MAX_SET_SIZE:
        raise ValueError(f"set_size {set_size} > {MAX_SET_SIZE}")
    block_d_cap, warps = {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (32, 8), 256: (32, 16)}[block_k]
    if fp32 and block_k <= 32:
        block_d_cap = 32
    # Narrower tiles for small d, except from K = 64 on, where they spilled (masking covers d < BLOCK_D).
    block_d = block_d_cap if block_k >= 64 else min(block_d_cap, max(16, 1 << (dim - 1).bit_length()))
    return dict(BLOCK_B=BLOCK_ROWS, BLOCK_K=block_k, BLOCK_D=block_d,
                CHUNKED=block_k > IN_REGISTER_SET_SIZE, CHUNK=GRAM_CHUNK, num_warps=warps, num_stages=NUM_STAGES)


def split_launch_config(set_size: int, dim: int, fp32: bool) -> dict:
    """The split-d plan's tiles: the tiled plan's, except that fp32 at K = 128 applies the Gram in
    chunks (held in registers next to the slice sums it spilled 452 B on sm_90a; chunked, none)."""
    cfg = launch_config(set_size, dim, fp32)
    if fp32 and cfg["BLOCK_K"] >= IN_REGISTER_SET_SIZE:
        cfg["CHUNKED"] = True
    return cfg


def launch_grid(rows: int, num_sets: int) -> tuple[int]:
    """One flat axis of row tiles x anchor sets: CUDA allows 2^31 - 1 programs there, while the
    y and z axes stop at 65,535 (a bank of more sets than that would not launch)."""
    return (-(-rows // BLOCK_ROWS) * num_sets,)


PLAN_ENV = "ANCHOR_KERNELS_TRITON_PLAN"
PLANS = ("auto", "tiled", "split_d")
# Split-d model (H100, issue 12): one 16-row program per (row tile, set) streams K x d of W_A
# with a few KB in flight, so at decode batch sizes most SMs idle. Splitting d into slices of at
# least MIN_SLICE columns gives each (tile, set) `slices` programs; aim at SPLIT_OCCUPANCY
# programs per SM. Modelled, not measured: no GPU has run these plans yet (make gpu-check).
MIN_SLICE = 256
SPLIT_OCCUPANCY = 2
DEFAULT_SMS = 132   # when the device cannot say (the CPU interpreter): an H100


def choose_plan(rows: int, dim: int, num_sets: int, device=None) -> dict:
    """The Triton plan for a general-objective launch, by shape: ``{"plan": "tiled"}`` or
    ``{"plan": "split_d", "slices": n}``. One place; ``$ANCHOR_KERNELS_TRITON_PLAN`` forces one.
    Read on the host when the op runs, so a CUDA graph keeps the plan it was captured with."""
    plan = os.environ.get(PLAN_ENV, "auto")
    if plan not in PLANS:
        raise ValueError(f"{PLAN_ENV} must be one of {PLANS}, got {plan!r}")
    max_slices = max(1, -(-dim // MIN_SLICE))
    if plan == "tiled" or max_slices == 1:
        return {"plan": "tiled"}
    sms = DEFAULT_SMS
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Programs with work: at most one per row tile per set (fewer when rows share sets).
    busy = min(-(-rows // BLOCK_ROWS) * num_sets, max(rows, 1))
    want = max(1, (SPLIT_OCCUPANCY * sms) // busy)
    if plan == "split_d":
        return {"plan": "split_d", "slices": max(2, min(max_slices, want))}
    if want < 2:
        return {"plan": "tiled"}
    return {"plan": "split_d", "slices": min(max_slices, want)}


def device_guard(device: torch.device):
    """Makes ``device`` current while a launch is set up: Triton launches on the current CUDA
    device, which need not be the tensors' (HF ``device_map="auto"`` puts layers on several).
    Under torch.compile the generated code guards the device itself."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _interpreting() -> bool:
    # Triton 3.9's CPU interpreter returns garbage for bf16 x bf16 tl.dot, so 16-bit operands
    # are widened to fp32 there; compiled kernels multiply them natively (tensor cores).
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_scalars(steps, objective, reg, temperature, margin, max_norm) -> None:
    """The scalar ranges every op entry point enforces (csrc/steer_args.h holds the same)."""
    torch._check(objective in ("mean", "lse"), lambda: f"steer_hidden: objective must be 'mean' or 'lse', got {objective!r}")
    torch._check(0 <= steps <= MAX_STEPS, lambda: f"steer_hidden: steps must be in [0, {MAX_STEPS}], got {steps}")
    torch._check(0 <= reg <= FP32_MAX, lambda: f"steer_hidden: reg must be >= 0 and finite in float32, got {reg}")
    torch._check(MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE,
                 lambda: f"steer_hidden: temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}")
    torch._check(not math.isnan(margin) and (math.isinf(margin) or abs(margin) <= FP32_MAX),
                 lambda: f"steer_hidden: margin must be finite in float32 or +inf, got {margin}")
    torch._check(max_norm >= 0 and (math.isinf(max_norm) or max_norm <= FP32_MAX),
                 lambda: f"steer_hidden: max_norm must be >= 0 and finite in float32, or +inf, got {max_norm}")


if IMPORT_ERROR is None:

    # fp32's range (issue 20, items 6 and 9), as csrc/kernels/fp_range.h: a sum of squares below
    # 2^-64 or past FLT_MAX is recomputed from values scaled by 2^64 or 2^-80; the K-space
    # quadratic forms take their vector scaled by 2^-x with max |v| < 2^-SIZE_BITS first
    # (2^SIZE_BITS >= MAX_SET_SIZE), so no partial sum overflows for any finite Gram.
    _FP32_MAX = tl.constexpr(FP32_MAX)
    _SQUARES_MIN = tl.constexpr(2.0**-64)
    _GRAM_DIAG_MIN = tl.constexpr(GRAM_DIAG_MIN)
    _SIZE_BITS = tl.constexpr(MAX_SET_SIZE.bit_length() - 1)
    # The split-d finish kernel's rare rescaled ||h0|| pass reads 16 columns at a time (the AOT check,
    # then reading a plain ptxas -v, found spills with its own tiles there).
    NORM_BLOCK_D = tl.constexpr(16)

    @triton.jit
    def _pow2(e):
        """2^e, exactly, for an int32 tensor e in [-126, 127] (fp_range.h's pow2)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _quadratic_exponent(m):
        """fp_range.h's quadratic_exponent: x with m 2^-x < 2^-SIZE_BITS, from m's exponent clamped
        to [-100, 100] (so 2^x and 2^-x are normal floats)."""
        e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        return tl.minimum(tl.maximum(e, -100), 100) + _SIZE_BITS

    @triton.jit
    def _robust_norm(h_sq, h_rows, mine, begin, end, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """||h0|| of the rows ``mine`` from their fp32 sums of squares ``h_sq``: rows whose sum is
        outside [2^-64, FLT_MAX] (hidden states near 1e-20 or 1e20) are read again over
        [begin, end), scaled by 2^64 or 2^-80 before squaring. Ordinary rows cost nothing more."""
        redo = mine & ((h_sq < _SQUARES_MIN) | (h_sq > _FP32_MAX) | (h_sq != h_sq))
        norm = tl.sqrt(h_sq)
        if tl.sum(redo.to(tl.int32), axis=0) > 0:
            small = h_sq < _SQUARES_MIN
            f = tl.where(small, 2.0**64, 2.0**-80)
            acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for d0 in range(begin, end, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                h = tl.load(h_rows + dd[None, :], mask=redo[:, None] & (dd < end)[None, :], other=0.0)
                h = h.to(tl.float32) * f[:, None]
                acc += tl.sum(h * h, axis=1)
            norm = tl.where(redo, tl.sqrt(acc) * tl.where(small, 2.0**-64, 2.0**80), norm)
        return norm

    # The K-space loop divides, takes square roots and exponentials with the hardware's fast
    # approximations (relative error about 2^-22, far inside METHOD.md's 1e-4), where the CUDA
    # and C++ kernels round IEEE: div_rn/sqrt_rn spilled 8-40 B per thread in the AOT check
    # (fp32 split-d finish at K = 64, bf16 K = 128, ...; a plain ptxas -v then, not Triton's
    # cubin). The self-test compares the compiled kernels with the C++ op on each GPU before they
    # serve it.
    @triton.jit
    def _gap_and_grad(z, w, log_w, tau, LSE: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """G per row and s = dG/dz per anchor (padding: s = 0), METHOD.md "The value gap"."""
        pos = (w > 0.0)[None, :]
        neg = (w < 0.0)[None, :]
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
        return gap, grad

    @triton.jit
    def _gram_times(c, gram_t, gram_base, row_scratch, mine, k, k_ok, set_size,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr,
                    CHUNK: tl.constexpr):
        """Gm c per row. Chunked: c goes through the rows' own scratch (one set per row, so
        one program per row: no other program touches it)."""
        if CHUNKED:
            tl.store(row_scratch + k[None, :], c, mask=mine[:, None])
            tl.debug_barrier()
            gc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            for j0 in tl.static_range(0, BLOCK_K, CHUNK):
                jj = j0 + tl.arange(0, CHUNK)
                c_part = tl.load(row_scratch + jj[None, :], mask=mine[:, None], other=0.0)
                g_part = tl.load(gram_base + k[None, :] * set_size + jj[:, None],
                                 mask=(jj < set_size)[:, None] & k_ok[None, :], other=0.0)
                gc += tl.dot(c_part, g_part, input_precision="ieee")
            tl.debug_barrier()  # all reads done before the next call overwrites the scratch
        else:
            gc = tl.dot(c, gram_t, input_precision="ieee")
        return gc

    @triton.jit
    def _tile_rows(row_sets_ptr, rows, num_sets, BLOCK_B: tl.constexpr):
        """Program (tile x set) of the flat grid: its set s, its rows r (int64), which exist, and
        their sets."""
        pid = tl.program_id(0)
        s = pid % num_sets
        r = (pid // num_sets).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_range = r < rows
        return s, r, in_range, tl.load(row_sets_ptr + r, mask=in_range, other=-1)

    @triton.jit
    def _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        """Set s's ids and signed weights. A live id outside the vocabulary leaves the set's rows
        untouched (mine and live cleared) and is never read: callers validate ids on the host,
        there is no sync here."""
        k = tl.arange(0, BLOCK_K)
        k_ok = k < set_size
        set_off = s.to(tl.int64) * set_size
        ids = tl.load(ids_ptr + set_off + k, mask=k_ok, other=0)
        w = tl.load(aw_ptr + set_off + k, mask=k_ok, other=0.0)
        live = w != 0.0
        bad = tl.sum((live & ((ids < 0) | (ids >= vocab))).to(tl.int32), axis=0)
        mine = mine & (tl.zeros((BLOCK_B,), dtype=tl.int32) + bad == 0)
        live = live & (tl.zeros((BLOCK_K,), dtype=tl.int32) + bad == 0)
        return k, k_ok, set_off, ids, w, live, mine

    @triton.jit
    def _finite_set(gram_ptr, set_off, set_size, k, k_ok, live, mine, BLOCK_B: tl.constexpr):
        """``mine`` cleared if set s has a non-finite anchor row of W, or one whose squared norm
        (its Gram diagonal) fp32 cannot hold to its accuracy (nonzero below 2^-80, or past
        FLT_MAX): such a set cannot steer, and its rows are left untouched, as in the C++ kernels.
        Checked before the z0 loop, so nothing more is live across it."""
        diag = tl.load(gram_ptr + set_off * set_size + k * set_size + k, mask=k_ok & live, other=0.0)
        ok = (diag == 0.0) | ((diag >= _GRAM_DIAG_MIN) & (diag <= _FP32_MAX))
        bad = tl.sum((live & (ok == 0)).to(tl.int32), axis=0)
        return mine & (tl.zeros((BLOCK_B,), dtype=tl.int32) + bad == 0)

    @triton.jit
    def _anchor_logits(h_rows, w_rows, mine, live, begin, end, NATIVE_DOT16: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """W_A h0 and ||h0||^2 of the rows ``mine`` over columns [begin, end). 16-bit inputs are
        multiplied as they are (exact products, fp32 accumulation); fp32 uses 3xTF32 (fp32
        accuracy)."""
        z0 = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        h_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(begin, end, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < end
            h = tl.load(h_rows + dd[None, :], mask=mine[:, None] & d_ok[None, :], other=0.0)
            wa = tl.load(w_rows + dd[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
            if h.dtype == tl.float32 or not NATIVE_DOT16:
                z0 += tl.dot(h.to(tl.float32), tl.trans(wa.to(tl.float32)), input_precision="tf32x3")
            else:
                z0 += tl.dot(h, tl.trans(wa))
            hf = h.to(tl.float32)
            h_sq += tl.sum(hf * hf, axis=1)
        return z0, h_sq

    @triton.jit
    def _usable_rows(eta, mine):
        """Per-row values are not host-checked on every path (direct op calls, device tensors):
        a row whose step is not finite and > 0 is not steered (left untouched, as in the C++
        kernels). Applied to ``mine`` right after eta is loaded, outside the register-bound
        K-space loop."""
        return mine & (eta > 0.0) & (eta < float("inf"))

    @triton.jit
    def _usable_norms(h_norm, mine):
        """A caller's ||h0|| (the logit form's hidden_norm) that is not finite and >= 0 leaves its
        row untouched where the trust region or the relative step uses it."""
        return mine & (h_norm >= 0.0) & (h_norm < float("inf"))

    @triton.jit
    def _kspace_loop(z0, w, live, eta, h_norm, mine, gram_base, row_scratch, k, k_ok, set_size,
                     steps, reg, tau, margin, max_norm, LSE: tl.constexpr, TRUST: tl.constexpr,
                     RELATIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                     CHUNKED: tl.constexpr, CHUNK: tl.constexpr):
        """c_T from the anchor logits z0 of the rows ``mine`` (METHOD.md, K-space): each step
        z = z0 + Gm c, c += eta m (s(z) - reg c), trust region on c^T Gm c. Gm c is carried
        across steps so a step is one K x K dot. Shared by the hidden and the logit kernels."""
        limit = max_norm * h_norm
        if CHUNKED:
            gram_t = 0.0
        else:  # gram_t[j, i] = Gm[i, j], held for all steps
            gram_t = tl.load(gram_base + k[None, :] * set_size + k[:, None],
                             mask=k_ok[:, None] & k_ok[None, :], other=0.0)
        log_w = tl.log(tl.where(live, tl.abs(w), 1.0))
        c = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        gc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        if TRUST or RELATIVE:  # an ||h0|| past FLT_MAX (or a caller's unusable one): untouched
            eta = tl.where((h_norm >= 0.0) & (h_norm < float("inf")), eta, 0.0)
        if RELATIVE:
            # The first step moves h by eta ||h0||: divide by ||grad G(h0)|| = sqrt(s0^T Gm s0),
            # the quadratic form of s0 scaled by 2^-x (fp_range.h).
            _, s0 = _gap_and_grad(z0, w, log_w, tau, LSE, BLOCK_B, BLOCK_K)
            s0 = tl.where(mine[:, None], s0, 0.0)
            x = _quadratic_exponent(tl.max(tl.abs(s0), axis=1))
            s0 = s0 * _pow2(-x)[:, None]
            g_sq = tl.sum(s0 * _gram_times(s0, gram_t, gram_base, row_scratch, mine, k, k_ok,
                                           set_size, BLOCK_B, BLOCK_K, CHUNKED, CHUNK), axis=1)
            ok = (g_sq > 0.0) & (g_sq < float("inf"))
            # ||h0|| 2^-x before the division (fp_range.h's relative_eta scales after it below ||h0|| = 1;
            # here always: that per-row choice spills 8 B in Triton's own cubin of the split-d finish
            # kernel, fp32 K <= 32 on sm_90a; rows below ~2^-117 are the only cost)
            eta = tl.where(ok, eta * (h_norm * _pow2(-x)) / tl.sqrt(tl.where(ok, g_sq, 1.0)), 0.0)
            eta = tl.where((eta == eta) & (eta < float("inf")), eta, 0.0)
        for _ in range(steps):
            gap, grad = _gap_and_grad(z0 + gc, w, log_w, tau, LSE, BLOCK_B, BLOCK_K)
            # A non-finite gap (non-finite hidden row) freezes the row.
            finite = (gap == gap) & (tl.abs(gap) < float("inf"))
            active = mine & finite & (gap < margin) & (eta != 0.0)
            c = tl.where(active[:, None], c + eta[:, None] * (grad - reg * c), c)
            if TRUST:
                # ||h - h0|| 2^-x = sqrt of the quadratic form of c 2^-x: past the limit c becomes
                # the scaled c times limit / ||.||, else it is scaled back (exactly).
                x = _quadratic_exponent(tl.max(tl.abs(c), axis=1))
                c = c * _pow2(-x)[:, None]
                gc = _gram_times(c, gram_t, gram_base, row_scratch, mine, k, k_ok, set_size,
                                 BLOCK_B, BLOCK_K, CHUNKED, CHUNK)
                n = tl.sqrt(tl.sum(c * gc, axis=1))
                r = tl.where(n > limit * _pow2(-x), limit / tl.where(n > 0.0, n, 1.0), _pow2(x))
                c = c * r[:, None]
                gc = gc * r[:, None]
            else:
                gc = _gram_times(c, gram_t, gram_base, row_scratch, mine, k, k_ok, set_size,
                                 BLOCK_B, BLOCK_K, CHUNKED, CHUNK)
        # As the C++ kernels (representable_edit): a row whose c is not finite, or whose edit's
        # terms sum_k |c_k| ||W_a_k|| exceed FLT_MAX (a step or edit fp32 cannot represent),
        # gets c = 0 and is left untouched.
        diag = tl.load(gram_base + k * set_size + k, mask=k_ok, other=0.0)
        bound = tl.sum(tl.where(c != 0.0, tl.abs(c) * tl.sqrt(diag)[None, :], 0.0), axis=1)
        return tl.where((bound <= _FP32_MAX)[:, None], c, 0.0)

    @triton.jit
    def _steer_hidden_kernel(
        hidden_ptr, weight_ptr, bias_ptr, ids_ptr, aw_ptr, gram_ptr, row_sets_ptr, eta_ptr,
        out_ptr, scratch_ptr, order_ptr, rows, dim, vocab, num_sets, set_size, hidden_row_stride,
        weight_row_stride, out_row_stride, steps, reg, tau, margin, max_norm,
        LSE: tl.constexpr, TRUST: tl.constexpr, HAS_BIAS: tl.constexpr, RELATIVE: tl.constexpr,
        NATIVE_DOT16: tl.constexpr, GROUPED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, CHUNKED: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """out[r] = h0 + W_A^T c_T for rows r of this tile using set s (METHOD.md, K-space):
        z0 = W_A h0 + b_A; each step z = z0 + Gm c, c += eta m (s(z) - reg c), trust region
        on c^T Gm c. Gm c is carried across steps so a step is one K x K dot. Offsets are
        int64: a strided prefill view can span more than 2^31 elements. GROUPED: tile rows are
        order[tile rows], the rows sorted by set, so a tile's rows mostly share one set (one W_A
        read per tile instead of one per set present)."""
        pid = tl.program_id(0)
        s = pid % num_sets
        r = (pid // num_sets).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_range = r < rows
        if GROUPED:
            r = tl.load(order_ptr + r, mask=in_range, other=0)
        rs = tl.load(row_sets_ptr + r, mask=in_range, other=-1)
        unclaimed = (rs < 0) | (rs >= num_sets)
        mine = in_range & (rs == s)
        copy_only = in_range & unclaimed & (tl.zeros((BLOCK_B,), dtype=tl.int32) + s == 0)
        h_rows = hidden_ptr + r[:, None] * hidden_row_stride
        o_rows = out_ptr + r[:, None] * out_row_stride
        if tl.sum(mine.to(tl.int32), axis=0) == 0:
            # No row of this tile uses set s: only copy the unclaimed rows (program s = 0).
            if tl.sum(copy_only.to(tl.int32), axis=0) > 0:
                for d0 in range(0, dim, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    m = copy_only[:, None] & (dd < dim)[None, :]
                    tl.store(o_rows + dd[None, :], tl.load(h_rows + dd[None, :], mask=m), mask=m)
        else:
            store = mine | copy_only
            k, k_ok, set_off, ids, w, live, mine = _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine,
                                                             BLOCK_B, BLOCK_K)
            eta = tl.load(eta_ptr + r, mask=mine, other=0.0)
            w_rows = weight_ptr + ids[:, None] * weight_row_stride

            z0, h_sq = _anchor_logits(h_rows, w_rows, mine, live, 0, dim, NATIVE_DOT16, BLOCK_B, BLOCK_K, BLOCK_D)
            if HAS_BIAS:
                z0 += tl.load(bias_ptr + ids, mask=live, other=0.0).to(tl.float32)[None, :]
            h_norm = _robust_norm(h_sq, h_rows, mine, 0, dim, BLOCK_B, BLOCK_D)

            c = _kspace_loop(z0, w, live, eta, h_norm, mine, gram_ptr + set_off * set_size,
                             scratch_ptr + r[:, None] * BLOCK_K, k, k_ok, set_size, steps, reg, tau,
                             margin, max_norm, LSE, TRUST, RELATIVE, BLOCK_B, BLOCK_K, CHUNKED, CHUNK)

            moved = tl.sum((c != 0.0).to(tl.int32), axis=1) > 0
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < dim
                h = tl.load(h_rows + dd[None, :], mask=store[:, None] & d_ok[None, :], other=0.0)
                wa = tl.load(w_rows + dd[None, :], mask=live[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                delta = tl.dot(c, wa, input_precision="tf32x3")
                new = (h.to(tl.float32) + delta).to(h.dtype)
                tl.store(o_rows + dd[None, :], tl.where(moved[:, None], new, h),
                         mask=store[:, None] & d_ok[None, :])

    @triton.jit
    def _split_partial_kernel(
        hidden_ptr, weight_ptr, ids_ptr, aw_ptr, row_sets_ptr, zp_ptr, hsq_ptr, rows, dim, vocab, num_sets,
        set_size, hidden_row_stride, weight_row_stride, slice_len,
        NATIVE_DOT16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Split-d plan, launch 1: program (tile x set, slice j) writes the partial z0 = W_A h0 and
        ||h0||^2 of its rows over d-slice j to zp[j] / hsq[j] (no atomics: the finish kernel sums
        the slices in a fixed order, so results are deterministic)."""
        j = tl.program_id(1)
        s, r, in_range, rs = _tile_rows(row_sets_ptr, rows, num_sets, BLOCK_B)
        mine = in_range & (rs == s)
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            k, k_ok, set_off, ids, w, live, mine = _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine,
                                                             BLOCK_B, BLOCK_K)
            h_rows = hidden_ptr + r[:, None] * hidden_row_stride
            w_rows = weight_ptr + ids[:, None] * weight_row_stride
            z0, h_sq = _anchor_logits(h_rows, w_rows, mine, live, j * slice_len, tl.minimum(dim, (j + 1) * slice_len),
                                      NATIVE_DOT16, BLOCK_B, BLOCK_K, BLOCK_D)
            at = j.to(tl.int64) * rows + r
            tl.store(zp_ptr + at[:, None] * BLOCK_K + k[None, :], z0, mask=mine[:, None])
            tl.store(hsq_ptr + at, h_sq, mask=mine)

    @triton.jit
    def _split_finish_kernel(
        hidden_ptr, weight_ptr, bias_ptr, ids_ptr, aw_ptr, gram_ptr, row_sets_ptr, eta_ptr, out_ptr, scratch_ptr,
        zp_ptr, hsq_ptr, rows, dim, vocab, num_sets, set_size, num_slices, hidden_row_stride, weight_row_stride,
        out_row_stride, slice_len, steps, reg, tau, margin, max_norm,
        LSE: tl.constexpr, TRUST: tl.constexpr, HAS_BIAS: tl.constexpr, RELATIVE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKED: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """Split-d plan, launch 2: program (tile x set, slice j) sums the partials in slice order,
        runs the K-space loop (every slice of a row runs the same loop on the same numbers, so
        they agree bit for bit) and writes h' = h0 + W_A^T c on slice j; program s = 0 also copies
        slice j of the rows no set claims."""
        j = tl.program_id(1)
        s, r, in_range, rs = _tile_rows(row_sets_ptr, rows, num_sets, BLOCK_B)
        mine = in_range & (rs == s)
        copy_only = in_range & ((rs < 0) | (rs >= num_sets)) & (tl.zeros((BLOCK_B,), dtype=tl.int32) + s == 0)
        store = mine | copy_only
        if tl.sum(store.to(tl.int32), axis=0) > 0:
            k, k_ok, set_off, ids, w, live, mine = _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine,
                                                             BLOCK_B, BLOCK_K)
            c = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            if tl.sum(mine.to(tl.int32), axis=0) > 0:
                # ||h0|| first (its rare rescaled pass re-reads the row): z0 is not live across it
                h_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
                for jj in range(0, num_slices):
                    h_sq += tl.load(hsq_ptr + ((r * 0 + jj) * rows + r), mask=mine, other=0.0)
                h_norm = _robust_norm(h_sq, hidden_ptr + r[:, None] * hidden_row_stride, mine, 0, dim,
                                      BLOCK_B, NORM_BLOCK_D)
                z0 = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
                for jj in range(0, num_slices):
                    at = (r * 0 + jj) * rows + r      # int64 (r is)
                    z0 += tl.load(zp_ptr + at[:, None] * BLOCK_K + k[None, :], mask=mine[:, None], other=0.0)
                if HAS_BIAS:
                    z0 += tl.load(bias_ptr + ids, mask=live, other=0.0).to(tl.float32)[None, :]
                eta = tl.load(eta_ptr + r, mask=mine, other=0.0)
                c = _kspace_loop(z0, w, live, eta, h_norm, mine, gram_ptr + set_off * set_size,
                                 scratch_ptr + (j.to(tl.int64) * rows + r)[:, None] * BLOCK_K, k, k_ok, set_size,
                                 steps, reg, tau, margin, max_norm, LSE, TRUST, RELATIVE, BLOCK_B, BLOCK_K,
                                 CHUNKED, CHUNK)
            moved = tl.sum((c != 0.0).to(tl.int32), axis=1) > 0
            h_rows = hidden_ptr + r[:, None] * hidden_row_stride
            o_rows = out_ptr + r[:, None] * out_row_stride
            w_rows = weight_ptr + ids[:, None] * weight_row_stride
            end = tl.minimum(dim, (j + 1) * slice_len)
            for d0 in range(j * slice_len, end, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < end
                h = tl.load(h_rows + dd[None, :], mask=store[:, None] & d_ok[None, :], other=0.0)
                wa = tl.load(w_rows + dd[None, :], mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                new = (h.to(tl.float32) + tl.dot(c, wa, input_precision="tf32x3")).to(h.dtype)
                tl.store(o_rows + dd[None, :], tl.where(moved[:, None], new, h), mask=store[:, None] & d_ok[None, :])

    @triton.jit
    def _mean_direction_kernel(weight_ptr, ids_ptr, aw_ptr, u_ptr, dim, vocab, set_size, weight_row_stride,
                               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """objective="mean" without a prepared direction, per set s and d-slice: u[s] = W_A^T w
        (METHOD.md's rank-one form). A live id outside the vocabulary is never read; the row
        kernel finds it and leaves the set's rows untouched."""
        s = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        k_ok = k < set_size
        ids = tl.load(ids_ptr + s * set_size + k, mask=k_ok, other=0)
        w = tl.load(aw_ptr + s * set_size + k, mask=k_ok, other=0.0)
        live = (w != 0.0) & (ids >= 0) & (ids < vocab)
        dd = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dd < dim
        wa = tl.load(weight_ptr + ids[:, None] * weight_row_stride + dd[None, :],
                     mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(u_ptr + s * dim + dd, tl.sum(wa * w[:, None], axis=0), mask=d_ok)

    @triton.jit
    def _steer_mean_kernel(
        hidden_ptr, u_ptr, bias_ptr, ids_ptr, aw_ptr, beta_ptr, row_sets_ptr, eta_ptr, out_ptr, rows, dim, vocab,
        num_sets, set_size, hidden_row_stride, out_row_stride, steps, reg, margin, max_norm,
        TRUST: tl.constexpr, RELATIVE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """objective="mean" in rank-one form: s = w is constant, so c = a w with a scalar a per row:
        gap = u.h0 + w.b_A + (a ||u||) ||u|| (||u||^2 = w^T Gm w, never formed: it can overflow),
        the trust region is |a| ||u|| <= rho ||h0||, and h' = h0 + a u, left untouched where
        |a| beta (beta = sum_k |w_k| ||W_a_k||, from the launcher) exceeds FLT_MAX. One pass over d
        for u.h0, a scalar loop, one pass for the axpy; same grid and row rules as the general
        kernel. u is the prepared direction or _mean_direction_kernel's; w.b_A is summed here."""
        s, r, in_range, rs = _tile_rows(row_sets_ptr, rows, num_sets, BLOCK_B)
        mine = in_range & (rs == s)
        copy_only = in_range & ((rs < 0) | (rs >= num_sets)) & (tl.zeros((BLOCK_B,), dtype=tl.int32) + s == 0)
        store = mine | copy_only
        _k, _k_ok, _set_off, ids, w, live, mine = _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine, BLOCK_B, BLOCK_K)
        wb = 0.0
        if HAS_BIAS:
            wb = tl.sum(tl.load(bias_ptr + ids, mask=live, other=0.0).to(tl.float32) * w, axis=0)
        if tl.sum(store.to(tl.int32), axis=0) > 0:
            h_rows = hidden_ptr + r[:, None] * hidden_row_stride
            o_rows = out_ptr + r[:, None] * out_row_stride
            u_row = u_ptr + s.to(tl.int64) * dim
            z = tl.zeros((BLOCK_B,), dtype=tl.float32)
            h_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
            gamma = 0.0
            if tl.sum(mine.to(tl.int32), axis=0) > 0:
                for d0 in range(0, dim, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < dim
                    h = tl.load(h_rows + dd[None, :], mask=mine[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                    u = tl.load(u_row + dd, mask=d_ok, other=0.0)
                    z += tl.sum(h * u[None, :], axis=1)
                    h_sq += tl.sum(h * h, axis=1)
                    gamma += tl.sum(u * u, axis=0)
            gap0 = z + wb
            h_norm = _robust_norm(h_sq, h_rows, mine, 0, dim, BLOCK_B, BLOCK_D)
            # ||u|| from its sum of squares, recomputed scaled where that is out of range
            unorm = tl.sqrt(gamma)
            if (tl.sum(mine.to(tl.int32), axis=0) > 0) & ((gamma < _SQUARES_MIN) | (gamma > _FP32_MAX) | (gamma != gamma)):
                f = tl.where(gamma < _SQUARES_MIN, 2.0**64, 2.0**-80)
                u_sq = 0.0
                for d0 in range(0, dim, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    u = tl.load(u_row + dd, mask=dd < dim, other=0.0) * f
                    u_sq += tl.sum(u * u, axis=0)
                unorm = tl.sqrt(u_sq) * tl.where(gamma < _SQUARES_MIN, 2.0**-64, 2.0**80)
            eta = tl.load(eta_ptr + r, mask=mine, other=0.0)
            if TRUST or RELATIVE:  # an ||h0|| past FLT_MAX: untouched, as in the C++ kernels
                eta = tl.where(h_norm < float("inf"), eta, 0.0)
            if RELATIVE:
                ok = (unorm > 0.0) & (unorm < float("inf"))
                eta = tl.where(ok, eta * h_norm / tl.where(ok, unorm, 1.0), 0.0)
                eta = tl.where((eta == eta) & (eta < float("inf")), eta, 0.0)
            limit = max_norm * h_norm
            a = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for _ in range(steps):
                gap = gap0 + a * unorm * unorm
                active = mine & (gap == gap) & (tl.abs(gap) < float("inf")) & (gap < margin) & (eta != 0.0)
                a = tl.where(active, a + eta * (1.0 - reg * a), a)
                if TRUST:
                    a_max = limit / unorm
                    a = tl.where(tl.abs(a) * unorm > limit, tl.where(a < 0.0, -a_max, a_max), a)
            a = tl.where(tl.abs(a) * tl.load(beta_ptr + s) <= _FP32_MAX, a, 0.0)
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m = store[:, None] & (dd < dim)[None, :]
                h = tl.load(h_rows + dd[None, :], mask=m, other=0.0)
                u = tl.load(u_row + dd, mask=dd < dim, other=0.0)
                new = (h.to(tl.float32) + a[:, None] * u[None, :]).to(h.dtype)
                tl.store(o_rows + dd[None, :], tl.where((a != 0.0)[:, None], new, h), mask=m)

    @triton.jit
    def _solve_logits_kernel(
        logits_ptr, ids_ptr, aw_ptr, gram_ptr, row_sets_ptr, eta_ptr, norm_ptr, c_ptr, scratch_ptr,
        rows, vocab, num_sets, set_size, logits_row_stride, steps, reg, tau, margin, max_norm,
        LSE: tl.constexpr, TRUST: tl.constexpr, RELATIVE: tl.constexpr, HAS_NORM: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """The logit form, step 1: c_T per row from its anchors' logits alone (z0 = logits[r, ids]).
        Same grid as the hidden kernel; c [rows, BLOCK_K] starts at zero and keeps it for rows
        no set claims."""
        s, r, in_range, rs = _tile_rows(row_sets_ptr, rows, num_sets, BLOCK_B)
        mine = in_range & (rs == s)
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            k, k_ok, set_off, ids, w, live, mine = _load_set(ids_ptr, aw_ptr, s, set_size, vocab, mine,
                                                             BLOCK_B, BLOCK_K)
            mine = _finite_set(gram_ptr, set_off, set_size, k, k_ok, live, mine, BLOCK_B)
            eta = tl.load(eta_ptr + r, mask=mine, other=0.0)
            mine = _usable_rows(eta, mine)
            z0 = tl.load(logits_ptr + r[:, None] * logits_row_stride + ids[None, :],
                         mask=mine[:, None] & live[None, :], other=0.0).to(tl.float32)
            if HAS_NORM:
                h_norm = tl.load(norm_ptr + r, mask=mine, other=0.0)
            else:
                h_norm = tl.zeros((BLOCK_B,), dtype=tl.float32)
            if TRUST or RELATIVE:
                mine = _usable_norms(h_norm, mine)
            c = _kspace_loop(z0, w, live, eta, h_norm, mine, gram_ptr + set_off * set_size,
                             scratch_ptr + r[:, None] * BLOCK_K, k, k_ok, set_size, steps, reg, tau,
                             margin, max_norm, LSE, TRUST, RELATIVE, BLOCK_B, BLOCK_K, CHUNKED, CHUNK)
            tl.store(c_ptr + r[:, None] * BLOCK_K + k[None, :], c, mask=mine[:, None])

    @triton.jit
    def _apply_logits_kernel(logits_ptr, mixing_ptr, c_ptr, row_sets_ptr, order_ptr, rows, vocab, num_sets, set_size,
                             logits_row_stride, GROUPED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_V: tl.constexpr):
        """The logit form, step 2, one GEMM per set: program (row tile x set s, vocabulary tile)
        adds C M^T[s] for the tile's rows of set s, C [BLOCK_B, K] (zero for other rows) times the
        [K, BLOCK_V] tile of M, on tensor cores (3xTF32: fp32 accuracy), so each M tile is read
        once per 16 rows of a set rather than once per row. M in its own dtype, widened; logits
        in theirs, fp32 accumulation. GROUPED: the tiles are of rows sorted by set (``order``), so
        a tile's rows mostly share one M. Rows with c = 0 (unsteered, frozen) are not touched."""
        pid = tl.program_id(0)
        s = pid % num_sets
        i = (pid // num_sets).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_range = i < rows
        r = tl.load(order_ptr + i, mask=in_range, other=0) if GROUPED else i
        rs = tl.load(row_sets_ptr + r, mask=in_range, other=-1)
        k = tl.arange(0, BLOCK_K)
        c = tl.load(c_ptr + r[:, None] * BLOCK_K + k[None, :], mask=(in_range & (rs == s))[:, None], other=0.0)
        mine = tl.sum((c != 0.0).to(tl.int32), axis=1) > 0
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = v < vocab
            m = tl.load(mixing_ptr + (s.to(tl.int64) * set_size + k[:, None]) * vocab + v[None, :],
                        mask=(k < set_size)[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
            delta = tl.dot(c, m, input_precision="tf32x3")
            ptrs = logits_ptr + r[:, None] * logits_row_stride + v[None, :]
            mask = mine[:, None] & v_ok[None, :]
            x = tl.load(ptrs, mask=mask)
            tl.store(ptrs, (x.to(tl.float32) + delta).to(x.dtype), mask=mask)

    def _check(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, direction=None):
        dev = hidden.device
        torch._check(hidden.dim() == 2, lambda: f"steer_hidden: hidden must be 2-D [B, d], got {tuple(hidden.shape)}")
        torch._check(hidden.dtype in (torch.float32, torch.float16, torch.bfloat16),
                     lambda: f"steer_hidden: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
        for name, t, dtype, dims in (("weight", weight, hidden.dtype, 2), ("anchor_ids", anchor_ids, torch.long, 2),
                                     ("anchor_weights", anchor_weights, torch.float32, 2),
                                     ("gram", gram, torch.float32, 3), ("row_sets", row_sets, torch.long, 1),
                                     ("step_size", step_size, torch.float32, 1)):
            torch._check(t.dim() == dims and t.dtype == dtype and t.device == dev,
                         lambda: f"steer_hidden: {name} must be a {dims}-D {dtype} tensor on hidden's device {dev}, got "
                                 f"{t.dim()}-D {t.dtype} on {t.device}")
        S, K = anchor_ids.shape
        torch._check(weight.shape[1] == hidden.shape[1], lambda: "steer_hidden: weight must be [V, d] with hidden's d")
        torch._check(tuple(anchor_weights.shape) == (S, K) and tuple(gram.shape) == (S, K, K),
                     lambda: "steer_hidden: anchor_weights must be [S, K] and gram [S, K, K] like anchor_ids")
        torch._check(row_sets.shape[0] == hidden.shape[0] and step_size.shape[0] == hidden.shape[0],
                     lambda: "steer_hidden: row_sets and step_size need one entry per row of hidden")
        torch._check(S * triton.cdiv(max(hidden.shape[0], 1), BLOCK_ROWS) < 2**31,
                     lambda: "steer_hidden: too many rows x anchor sets for one Triton grid")
        torch._check(K <= MAX_SET_SIZE, lambda: f"steer_hidden: the triton backend supports anchor sets of at most "
                                                 f"{MAX_SET_SIZE} tokens, got K = {K}; use backend='cuda' or 'cpu'")
        if direction is not None:
            torch._check(tuple(direction.shape) == (S, hidden.shape[1]) and direction.dtype == torch.float32
                         and direction.device == dev,
                         lambda: f"steer_hidden: direction must be [S, d] = [{S}, {hidden.shape[1]}] float32 on "
                                 f"hidden's device {dev}, got {list(direction.shape)} {direction.dtype} on {direction.device}")
        if bias is not None:
            torch._check(bias.shape == (weight.shape[0],) and bias.dtype == hidden.dtype and bias.device == dev,
                         lambda: f"steer_hidden: bias must be [V] = [{weight.shape[0]}] {hidden.dtype} on hidden's "
                                 f"device {dev}, got {list(bias.shape)} {bias.dtype} on {bias.device}")

    def _usable_steps(anchor_weights, gram, row_sets, step_size):
        """Per-row values are not host-checked on every path (direct op calls, device tensors): a
        step that is not finite and > 0, or a set with a non-finite anchor row of W or one whose
        squared norm fp32 cannot hold (a Gram diagonal failing anchors.gram_diag_ok), becomes a
        step of 0, which the hidden kernels leave untouched, as the C++ kernels do. A few
        elementwise ops on the device, no sync; here, not in the kernels, whose K-space loop is at
        its register limit on sm_90a. The hidden kernels compute ||h0|| themselves, scaled where
        its square would leave fp32's range (issue 20, item 9): it is infinite only past FLT_MAX,
        and such a row is left untouched where the trust region or the relative step uses it
        (_kspace_loop, _steer_mean_kernel), as in the C++ kernels."""
        diag = gram.diagonal(dim1=1, dim2=2)
        finite_set = (gram_diag_ok(diag) | (anchor_weights == 0)).all(-1)              # [S]
        usable = (step_size > 0) & torch.isfinite(step_size) & finite_set[row_sets.clamp(0, gram.shape[0] - 1)]
        return torch.where(usable, step_size, 0.0)

    # The schema is inferred from these annotations (triton_op ignores schema=); a test holds
    # it equal to the C++ declaration in csrc/ops.cpp.
    @torch.library.triton_op("anchor_kernels::steer_hidden_triton", mutates_args=())
    def steer_hidden_triton(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        anchor_ids: torch.Tensor, anchor_weights: torch.Tensor, gram: torch.Tensor,
        row_sets: torch.Tensor, step_size: torch.Tensor, steps: int, objective: str, reg: float,
        temperature: float, margin: float, max_norm: float, relative_step: bool,
        direction: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        with device_guard(hidden.device):
            _check(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, direction)
            check_scalars(steps, objective, reg, temperature, margin, max_norm)
            step_size = _usable_steps(anchor_weights, gram, row_sets, step_size)
            if hidden.stride(-1) != 1:
                hidden = hidden.contiguous()
            if weight.stride(-1) != 1:
                weight = weight.contiguous()
            if bias is not None and bias.stride(0) != 1:  # the kernels index bias by token id
                bias = bias.contiguous()
            out = hidden.new_empty(hidden.shape)
            rows, dim = hidden.shape
            S, K = anchor_ids.shape
            if rows == 0:
                return out
            if objective == "mean":
                _steer_mean(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, out, steps,
                            reg, margin, max_norm, relative_step, direction)
                return out
            cfg = launch_config(K, dim, hidden.dtype == torch.float32)
            plan = choose_plan(rows, dim, S, hidden.device)
            if plan["plan"] == "split_d":
                _steer_split(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, out, steps,
                             objective, reg, temperature, margin, max_norm, relative_step,
                             split_launch_config(K, dim, hidden.dtype == torch.float32), plan["slices"])
                return out
            grid = launch_grid(rows, S)
            scratch = hidden.new_empty((rows, cfg["BLOCK_K"]) if cfg["CHUNKED"] else (1, 1), dtype=torch.float32)
            # Several sets and more than one tile: group rows by set on the device (a stable sort, no
            # host sync); -1 rows sort first and their tiles only copy.
            grouped = S > 1 and rows > BLOCK_ROWS
            order = torch.argsort(row_sets, stable=True) if grouped else row_sets
            torch.library.wrap_triton(_steer_hidden_kernel)[grid](
                hidden, weight, weight if bias is None else bias, anchor_ids.contiguous(),
                anchor_weights.contiguous(), gram.contiguous(), row_sets.contiguous(),
                step_size.contiguous(), out, scratch, order, rows, dim, weight.shape[0], S, K, hidden.stride(0),
                weight.stride(0), out.stride(0), steps, reg, temperature, margin, max_norm,
                LSE=objective == "lse", TRUST=max_norm != float("inf"), HAS_BIAS=bias is not None,
                RELATIVE=relative_step, NATIVE_DOT16=not _interpreting(), GROUPED=grouped, **cfg,
            )
            return out

    def _steer_split(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, out, steps,
                     objective, reg, temperature, margin, max_norm, relative_step, cfg, slices):
        rows, dim = hidden.shape
        S, K = anchor_ids.shape
        block_k, block_d = cfg["BLOCK_K"], cfg["BLOCK_D"]
        slice_len = triton.cdiv(triton.cdiv(dim, slices), block_d) * block_d
        slices = triton.cdiv(dim, slice_len)
        zp = hidden.new_empty((slices, rows, block_k), dtype=torch.float32)
        hsq = hidden.new_empty((slices, rows), dtype=torch.float32)
        scratch = hidden.new_empty((slices * rows, block_k) if cfg["CHUNKED"] else (1, 1), dtype=torch.float32)
        ids, aw, rs = anchor_ids.contiguous(), anchor_weights.contiguous(), row_sets.contiguous()
        grid = (launch_grid(rows, S)[0], slices)
        torch.library.wrap_triton(_split_partial_kernel)[grid](
            hidden, weight, ids, aw, rs, zp, hsq, rows, dim, weight.shape[0], S, K, hidden.stride(0),
            weight.stride(0), slice_len, NATIVE_DOT16=not _interpreting(), BLOCK_B=cfg["BLOCK_B"], BLOCK_K=block_k,
            BLOCK_D=block_d, num_warps=cfg["num_warps"], num_stages=NUM_STAGES)
        torch.library.wrap_triton(_split_finish_kernel)[grid](
            hidden, weight, weight if bias is None else bias, ids, aw, gram.contiguous(), rs,
            step_size.contiguous(), out, scratch, zp, hsq, rows, dim, weight.shape[0], S, K, slices,
            hidden.stride(0), weight.stride(0), out.stride(0), slice_len, steps, reg, temperature, margin, max_norm,
            LSE=objective == "lse", TRUST=max_norm != float("inf"), HAS_BIAS=bias is not None,
            RELATIVE=relative_step, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=block_k, BLOCK_D=block_d,
            CHUNKED=cfg["CHUNKED"], CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"], num_stages=NUM_STAGES)

    # The rank-one (mean) kernels: mat-vecs, no tile of W_A in registers.
    MEAN_BLOCK_D = 128

    def mean_launch_config(set_size: int) -> dict:
        """Tiles of the two mean kernels (also what the AOT check compiles)."""
        block_k = max(16, 1 << (set_size - 1).bit_length())
        # 2048-element [BLOCK_K, BLOCK_D] tiles: 4096 spill 24 B at K = 16 (fp16, sm_80, Triton's cubin).
        return dict(direction=dict(BLOCK_K=block_k, BLOCK_D=max(16, 2048 // block_k), num_warps=4, num_stages=NUM_STAGES),
                    rows=dict(BLOCK_B=BLOCK_ROWS, BLOCK_K=block_k, BLOCK_D=MEAN_BLOCK_D, num_warps=4,
                              num_stages=NUM_STAGES))

    def _steer_mean(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets, step_size, out, steps, reg,
                    margin, max_norm, relative_step, direction):
        rows, dim = hidden.shape
        S, K = anchor_ids.shape
        cfg = mean_launch_config(K)
        ids, aw = anchor_ids.contiguous(), anchor_weights.contiguous()
        # beta = sum_k |w_k| ||W_a_k|| per set: |a| beta bounds the edit a u (the kernel leaves a
        # row untouched past FLT_MAX, as the C++ kernels); a few device ops, no sync.
        live = anchor_weights != 0
        beta = (anchor_weights.abs() * torch.where(live, gram.diagonal(dim1=1, dim2=2), 0.0).sqrt()).sum(-1)
        if direction is None:
            u = hidden.new_empty((S, dim), dtype=torch.float32)
            d_cfg = cfg["direction"]
            torch.library.wrap_triton(_mean_direction_kernel)[(S, triton.cdiv(dim, d_cfg["BLOCK_D"]))](
                weight, ids, aw, u, dim, weight.shape[0], K, weight.stride(0), **d_cfg)
        else:
            u = direction.contiguous()
        torch.library.wrap_triton(_steer_mean_kernel)[launch_grid(rows, S)](
            hidden, u, weight if bias is None else bias, ids, aw, beta, row_sets.contiguous(), step_size.contiguous(),
            out, rows, dim, weight.shape[0], S, K, hidden.stride(0), out.stride(0), steps, reg, margin, max_norm,
            TRUST=max_norm != float("inf"), RELATIVE=relative_step, HAS_BIAS=bias is not None, **cfg["rows"])

    from .autograd import register as _register_autograd

    _register_autograd("anchor_kernels::steer_hidden_triton")

    # Elements of the [BLOCK_K, BLOCK_V] mixing tile one program of the apply kernel holds (its
    # [BLOCK_ROWS, BLOCK_V] result is no larger while K >= 16), over APPLY_WARPS warps.
    APPLY_TILE = 8192
    APPLY_WARPS = 8

    def apply_block_v(block_k: int) -> int:
        return max(32, APPLY_TILE // block_k)

    @torch.library.triton_op("anchor_kernels::steer_logits_triton_", mutates_args=("logits",))
    def steer_logits_triton_(
        logits: torch.Tensor, mixing: torch.Tensor, anchor_ids: torch.Tensor, anchor_weights: torch.Tensor,
        gram: torch.Tensor, row_sets: torch.Tensor, step_size: torch.Tensor, hidden_norm: Optional[torch.Tensor],
        steps: int, objective: str, reg: float, temperature: float, margin: float, max_norm: float,
        relative_step: bool,
    ) -> None:
        """The logit-space form in place (the schema of the C++ ``steer_logits_``): two launches,
        a K-space solve per row from its anchors' logits, then + M c over the vocabulary."""
        with device_guard(logits.device):
            dev = logits.device
            torch._check(logits.dim() == 2 and logits.dtype in (torch.float32, torch.float16, torch.bfloat16),
                         lambda: f"steer_logits_: logits must be 2-D float32/float16/bfloat16, got {logits.dim()}-D {logits.dtype}")
            torch._check(logits.stride(-1) == 1, lambda: "steer_logits_: logits rows must be contiguous")
            rows, vocab = logits.shape
            S, K = anchor_ids.shape
            torch._check(mixing.dtype in (torch.float32, torch.float16, torch.bfloat16),
                         lambda: f"steer_logits_: mixing must be float32, float16 or bfloat16, got {mixing.dtype}")
            for name, t, dtype, shape in (("mixing", mixing, mixing.dtype, (S, K, vocab)),
                                          ("anchor_ids", anchor_ids, torch.long, (S, K)),
                                          ("anchor_weights", anchor_weights, torch.float32, (S, K)),
                                          ("gram", gram, torch.float32, (S, K, K)),
                                          ("row_sets", row_sets, torch.long, (rows,)),
                                          ("step_size", step_size, torch.float32, (rows,))):
                torch._check(tuple(t.shape) == shape and t.dtype == dtype and t.device == dev,
                             lambda: f"steer_logits_: {name} must be {dtype} {list(shape)} on {dev}, got "
                                     f"{t.dtype} {list(t.shape)} on {t.device}")
            needs_norm = relative_step or max_norm != float("inf")
            torch._check(hidden_norm is not None or not needs_norm,
                         lambda: "steer_logits_: relative_step and max_norm need hidden_norm (||h0|| per row)")
            if hidden_norm is not None:
                torch._check(tuple(hidden_norm.shape) == (rows,) and hidden_norm.dtype == torch.float32
                             and hidden_norm.device == dev, lambda: "steer_logits_: hidden_norm must be float32 [rows]")
            torch._check(K <= MAX_SET_SIZE, lambda: f"steer_logits_: the triton backend supports anchor sets of at most "
                                                     f"{MAX_SET_SIZE} tokens, got K = {K}")
            check_scalars(steps, objective, reg, temperature, margin, max_norm)
            if rows == 0:
                return
            cfg = launch_config(K, 1, True)
            block_k = cfg["BLOCK_K"]
            c = torch.zeros((rows, block_k), dtype=torch.float32, device=dev)
            scratch = c.new_empty((rows, block_k) if cfg["CHUNKED"] else (1, 1))
            torch.library.wrap_triton(_solve_logits_kernel)[launch_grid(rows, S)](
                logits, anchor_ids.contiguous(), anchor_weights.contiguous(), gram.contiguous(),
                row_sets.contiguous(), step_size.contiguous(),
                step_size if hidden_norm is None else hidden_norm.contiguous(), c, scratch,
                rows, vocab, S, K, logits.stride(0), steps, reg, temperature, margin, max_norm,
                LSE=objective == "lse", TRUST=max_norm != float("inf"), RELATIVE=relative_step,
                HAS_NORM=hidden_norm is not None, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=block_k,
                CHUNKED=cfg["CHUNKED"], CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"], num_stages=NUM_STAGES,
            )
            block_v = apply_block_v(block_k)
            grouped = S > 1 and rows > BLOCK_ROWS  # as the hidden kernel: sort rows by set, no host sync
            order = torch.argsort(row_sets, stable=True) if grouped else row_sets
            torch.library.wrap_triton(_apply_logits_kernel)[(launch_grid(rows, S)[0], triton.cdiv(vocab, block_v))](
                logits, mixing.contiguous(), c, row_sets.contiguous(), order, rows, vocab, S, K, logits.stride(0),
                GROUPED=grouped, BLOCK_B=BLOCK_ROWS, BLOCK_K=block_k, BLOCK_V=block_v, num_warps=APPLY_WARPS,
                num_stages=NUM_STAGES,
            )
