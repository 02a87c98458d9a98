"""The logit-space form (METHOD.md): the same edit from raw logits, for engines whose plug-in
API only sees logits (an HF LogitsProcessor, vLLM v1 logits processors, ...).

    W h' + b = (W h0 + b) + M c_T,   M = W W_A^T  [V, K] per set, computed once.
"""
from __future__ import annotations

import torch

from . import native, selftest
from .anchors import PreparedAnchors, prepare_anchors
from .config import SteerConfig
from .kspace import require_hidden_norm, solve_coefficients
from .steer import _host_values, _per_row, _row_sets, _step_size, unavailable_reason

# backend="auto" per device type: the fused op where it runs, else the eager form.
LOGIT_BACKENDS = ("cpu", "cuda", "triton", "eager")
LOGIT_AUTO_ORDER = {"cpu": ("cpu", "eager"), "cuda": ("cuda", "triton", "eager")}

# Rows of W converted to fp32 at a time while M is built: bounds the transient copy.
MIXING_CHUNK_BYTES = 8 << 20


class LogitSteerer:
    """Applies anchor steering to raw logits ``[..., V]``.

    The logits must be raw: before soft-capping (Gemma 2's ``final_logit_softcapping``),
    temperature, repetition penalties or any other processor, or the edit is not the one
    METHOD.md defines. The trust region (``max_norm``) and the relative step (``strength=``, the
    default) need ``||h0||``, which logits do not carry: such a config is refused unless
    ``with_hidden_norm=True`` promises ``hidden_norm`` on every call; otherwise give the literal
    step, ``SteerConfig(eta=...)``.
    """

    def __init__(self, weight: torch.Tensor, anchors, config: SteerConfig | None = None,
                 bias: torch.Tensor | None = None, backend: str = "auto", with_hidden_norm: bool = False,
                 mixing_dtype: torch.dtype | None = None):
        """``backend``: "auto" (the fused op for the device: C++ on CPU; CUDA, then Triton, on a
        GPU; the eager form where none runs), "cpu", "cuda", "triton" or "eager".
        ``mixing_dtype``: of M, which the op reads whole for every steered row. None: the head's
        dtype where it is 16-bit (half the bytes, at the 16-bit tolerance its inputs already
        have; fp16 only where |M| <= max ||W_v||^2 stays in its range), else fp32. A 16-bit M on
        an fp32 head trades METHOD.md's fp32 tolerance for the 16-bit one (2e-2 on the edit)."""
        self.config = SteerConfig() if config is None else config
        if not isinstance(self.config, SteerConfig):
            raise TypeError(f"config must be a SteerConfig, got {type(self.config).__name__}")
        needs = needs_hidden_norm(self.config)
        if needs and not with_hidden_norm:  # refused here, not at the first generated token
            raise ValueError(
                f"the logit form cannot run {needs}: it needs ||h0||, which logits do not carry. Use "
                "SteerConfig(eta=..., max_norm=None) (METHOD.md's literal step), or pass with_hidden_norm=True and "
                "hidden_norm= on every call, or steer the hidden state instead")
        self.with_hidden_norm = bool(with_hidden_norm)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError("weight must be the [V, d] floating-point LM-head weight")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
            raise ValueError(f"bias must be a [V] = [{weight.shape[0]}] tensor")
        # The bias cancels in W h' + b - (W h0 + b); it is accepted for symmetry with steer_hidden.
        self.prepared: PreparedAnchors = prepare_anchors(weight, anchors)
        self.backend = _resolve(backend, weight.device, weight.dtype)
        self.vocab = weight.shape[0]
        # M^T per set: [S, K, V] (the op adds K rows of it to a logit row), summed in fp32 a chunk
        # of W at a time (no fp32 copy of the head), stored in mixing_dtype.
        # Padding columns are zero; where, not a product, so they never read a real row.
        live = (self.prepared.anchor_weights != 0).unsqueeze(-1)
        S, K = self.prepared.anchor_ids.shape
        self.mixing = torch.empty(S, K, self.vocab, dtype=_mixing_dtype(weight, mixing_dtype), device=weight.device)
        chunk = max(1, MIXING_CHUNK_BYTES // (4 * weight.shape[1]))
        with torch.no_grad():
            rows = torch.where(live, weight[self.prepared.anchor_ids].float(), 0.0)
            for v0 in range(0, self.vocab, chunk):
                self.mixing[:, :, v0: v0 + chunk] = torch.einsum("vd,skd->skv", weight[v0: v0 + chunk].float(), rows)

    @property
    def num_sets(self) -> int:
        return self.prepared.anchor_ids.shape[0]

    def __call__(self, logits: torch.Tensor, row_sets=None, step_size=None,
                 hidden_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Steered copy of raw ``logits [..., V]``."""
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
        return self.apply_(logits.clone(), row_sets, step_size, hidden_norm)

    def apply_(self, logits: torch.Tensor, row_sets=None, step_size=None,
               hidden_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Steers raw ``logits [..., V]`` in place and returns them. The fused ops
        (``anchor_kernels::steer_logits_``, C++ on CPU and CUDA; ``steer_logits_triton_``) read the
        anchors' logits of each steered row, run the K-space loop and add M c to the row;
        unsteered rows are not touched. ``step_size``: optional per-row steps in the config's
        form (literal eta for ``SteerConfig(eta=...)``, relative for ``strength=``)."""
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] != self.vocab:
            raise ValueError(f"logits must be [..., V] with V = {self.vocab}, got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
        if logits.device != self.mixing.device:
            raise ValueError(f"logits are on {logits.device} but the steerer is on {self.mixing.device}")
        if logits.requires_grad and torch.is_grad_enabled():
            # The edit is applied in place, outside autograd: a gradient would silently be the identity.
            raise RuntimeError("logits require grad, but LogitSteerer is not differentiable: call it under "
                               "torch.no_grad(), or steer the hidden state with steer_hidden (differentiable)")
        lead = logits.shape[:-1]
        rows = _row_sets(row_sets, self.num_sets, lead, logits.device)
        eta = _step_size(step_size, self.config, lead, logits.device)
        norm = None
        if hidden_norm is not None:
            norm = _per_row(hidden_norm, "hidden_norm", lead, logits.device, torch.float32)
            if _host_values(norm) and not bool((torch.isfinite(norm) & (norm >= 0)).all()):
                raise ValueError("hidden_norm entries must be finite and >= 0 (they are ||h0||)")
            norm = norm.to(logits.device)
        require_hidden_norm(self.config, norm)
        if logits.numel() == 0:
            return logits
        # A layout flag, not a data_ptr comparison: torch.compile(fullgraph=True) traces it.
        contiguous = logits.is_contiguous()
        # contiguous(), not clone(): a clone keeps a column-major layout, which the ops cannot edit.
        flat = logits.view(-1, self.vocab) if contiguous else logits.reshape(-1, self.vocab).contiguous()
        c = self.config
        if self.backend != "eager":
            if self.backend == "triton":
                from .triton_steer import steer_logits_triton_ as op
            else:
                op = torch.ops.anchor_kernels.steer_logits_
            op(flat, self.mixing, *self.prepared.tensors, rows, eta, norm, c.steps, c.objective, float(c.reg),
               float(c.temperature), c.margin_value, c.max_norm_value, c.relative_step)
        else:  # the same maths in eager torch, for devices without a fused op
            ids = self.prepared.anchor_ids[rows.clamp(0, self.num_sets - 1)]      # [B, K]
            z0 = flat.float().gather(-1, ids)
            coef = solve_coefficients(z0, self.prepared, rows, eta, self.config, hidden_norm=norm)
            delta = torch.zeros_like(flat, dtype=torch.float32)
            for s in range(self.num_sets):
                delta += (coef * (rows == s).unsqueeze(-1)) @ self.mixing[s].float()
            flat.copy_(flat.float() + delta)
        if not contiguous:  # flat is a copy
            logits.copy_(flat.view(logits.shape))
        return logits


def _mixing_dtype(weight: torch.Tensor, wanted: torch.dtype | None) -> torch.dtype:
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if wanted is not None:
        if wanted not in dtypes:
            raise TypeError(f"mixing_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {wanted!r}")
        return wanted
    if weight.dtype == torch.bfloat16:
        return weight.dtype
    if weight.dtype == torch.float16:
        # |M[v, a]| <= ||W_v|| ||W_a|| <= max ||W_v||^2: fp16 only where that fits
        chunk = max(1, MIXING_CHUNK_BYTES // (4 * weight.shape[1]))
        with torch.no_grad():
            bound = max(weight[v0: v0 + chunk].float().norm(dim=1).max().item()
                        for v0 in range(0, weight.shape[0], chunk)) ** 2
        return torch.float16 if bound <= torch.finfo(torch.float16).max else torch.float32
    return torch.float32


def needs_hidden_norm(config: SteerConfig) -> str | None:
    """The fields of ``config`` that need ||h0|| (None if none does), as a message names them."""
    fields = [f for f, on in ((f"strength={config.strength} (the relative step)", config.relative_step),
                              (f"max_norm={config.max_norm}", config.max_norm is not None)) if on]
    return " and ".join(f"SteerConfig.{f}" for f in fields) or None


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """As steer.resolve_backend: a GPU backend must pass its self-test in the logit form (with the
    head's dtype) first; auto skips one that failed, an explicit choice raises."""
    if backend == "auto":
        for name in LOGIT_AUTO_ORDER.get(device.type, ("eager",)):
            if name == "eager" or (_unavailable(name, device) is None
                                   and selftest.failure(name, device, dtype, "logits") is None):
                return name
    if backend not in LOGIT_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {LOGIT_BACKENDS}, got {backend!r}")
    why = _unavailable(backend, device)
    failed = selftest.failure(backend, device, dtype, "logits") if why is None else None
    if failed is not None:
        why = f"it failed its known-answer self-test on {device} for {dtype}: {failed}"
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    return backend


def _unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "eager":
        return None
    if backend == "cpu" and not native.available():
        return f"anchor_kernels._C is not built ({native.LOAD_ERROR})"
    return unavailable_reason(backend, device)
