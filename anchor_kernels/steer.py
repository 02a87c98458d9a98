"""``steer_hidden``: the public entry point, and the one place where a backend is chosen."""
from __future__ import annotations

import math
import os

import torch

from . import native, reference, selftest
from .anchors import PreparedAnchors, as_bank, check_finite_anchors, check_vocab, prepare_anchors
from .config import SteerConfig

BACKENDS = ("reference", "cpu", "cuda", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ordered preference of backend="auto" per device type.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# The batched plan (issue 12): from this many rows x anchors on, auto prefers Triton's tiled plan
# on a GPU (tensor-core dots over 16-row tiles) to the CUDA kernel's block per row with FMA dots.
# Modelled (no GPU has timed the crossover yet): 64 rows x 64 anchors.
BATCHED_MIN_ROWS_X_ANCHORS = 4096
BACKEND_ENV = "ANCHOR_KERNELS_BACKEND"


def _triton_status(device: torch.device) -> str | None:
    from . import triton_steer

    if triton_steer.IMPORT_ERROR is not None:
        return f"triton is not importable ({triton_steer.IMPORT_ERROR})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors Triton runs only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_status(device)
    if not native.available():
        return f"anchor_kernels._C is not built ({native.LOAD_ERROR})"
    if backend == "cpu":
        return None if device.type == "cpu" else f"the cpu backend needs CPU tensors, got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        if not native.cuda_built():
            return "anchor_kernels._C was built without CUDA"
        problem = native.cuda_device_problem(device.index if device.index is not None else torch.cuda.current_device())
        return None if problem is None else f"the CUDA kernels cannot run on {device}: {problem}"
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, rows: int = 0, set_size: int = 0,
                    dtype: torch.dtype | None = None) -> str:
    """Turns ``backend`` ("auto" or a name) into the backend that will run, or raises. With the
    batch shape, auto takes the batched (Triton) plan for large rows x anchors on a GPU, where
    Triton holds the set. With ``dtype``, a GPU backend must first pass its known-answer
    self-test on the device (anchor_kernels.selftest): auto skips one that failed, an explicit
    ``backend=`` raises."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ())
        if device.type == "cuda" and rows * set_size >= BATCHED_MIN_ROWS_X_ANCHORS:
            from .triton_steer import MAX_SET_SIZE as triton_max_set_size

            if set_size <= triton_max_set_size:
                order = ("triton",) + tuple(n for n in order if n != "triton")
        for name in order:
            if unavailable_reason(name, device) is None and (dtype is None or selftest.failure(name, device, dtype) is None):
                return name
        raise RuntimeError(f"no anchor_kernels backend runs on {device}; pass backend='reference' "
                           "for the (slow) fp64 reference")
    why = unavailable_reason(backend, device)
    if why is None and dtype is not None:
        failed = selftest.failure(backend, device, dtype)
        if failed is not None:
            why = f"it failed its known-answer self-test on {device} for {dtype}: {failed}"
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    return backend


def _check_inputs(hidden, weight, bias) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if hidden.dtype not in DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must be [..., d] with d >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, d] = {tuple(weight.shape)} but hidden has d = {hidden.shape[-1]}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a [V] = [{weight.shape[0]}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}; they must match")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def _host_values(t: torch.Tensor) -> bool:
    """Whether checking t's values costs no device sync (and we are not tracing)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _per_row(value, name: str, lead_shape, device, dtype) -> torch.Tensor:
    """One entry per row of hidden, as a flat tensor on the host or already on ``device``."""
    rows = math.prod(lead_shape)
    if isinstance(value, torch.Tensor) and value.dtype == dtype and value.dim() == 1 and value.shape[0] == rows:
        return value  # already flat and typed (an engine's per-slot table): no conversion per step
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # strings, ints past int64, ...
        raise TypeError(f"{name} must be a tensor or a sequence of {'integers' if dtype == torch.long else 'reals'} "
                        f"(one per row of hidden), got {value!r:.80}: {exc}") from None
    if t.dtype == torch.bool or t.is_complex() or (dtype == torch.long and t.is_floating_point()):
        raise TypeError(f"{name} must hold {'integers' if dtype == torch.long else 'reals'}, got {t.dtype}")
    if tuple(t.shape) not in (tuple(lead_shape), (rows,)):
        raise ValueError(f"{name} must have one entry per row of hidden (shape {tuple(lead_shape)} "
                         f"or ({rows},)), got shape {tuple(t.shape)}")
    return t.reshape(rows).to(dtype)


# Values are checked only where that needs no device sync (lists, CPU tensors): a per-step
# sync would stall decoding. On-device row_sets out of range leave their rows untouched.
def _row_sets(row_sets, num_sets: int, lead_shape, device) -> torch.Tensor:
    if row_sets is None:
        if num_sets > 1:
            raise ValueError("row_sets is required with an AnchorBank of several sets "
                             "(one set index per row, -1 = leave the row untouched)")
        return torch.zeros(math.prod(lead_shape), dtype=torch.long, device=device)
    t = _per_row(row_sets, "row_sets", lead_shape, device, torch.long)
    if _host_values(t) and t.numel():
        lo, hi = (int(x) for x in torch.aminmax(t))
        if lo < -1 or hi >= num_sets:
            bad = (t < -1) | (t >= num_sets)
            raise ValueError(f"row_sets entries must be in [-1, {num_sets}), got "
                             f"{sorted(set(t[bad].tolist()))}")
    return t.to(device)


def _step_size(step_size, config: SteerConfig, lead_shape, device) -> torch.Tensor:
    if step_size is None:
        return torch.full((math.prod(lead_shape),), config.step_size, dtype=torch.float32, device=device)
    t = _per_row(step_size, "step_size", lead_shape, device, torch.float32)
    if _host_values(t) and t.numel():
        lo, hi = (float(x) for x in torch.aminmax(t))  # NaN propagates, and fails both comparisons
        if not (lo >= 0 and hi < math.inf):
            raise ValueError("step_size entries must be >= 0 and finite in float32")
    return t.to(device)


def steer_hidden(hidden: torch.Tensor, weight: torch.Tensor, anchors, config: SteerConfig | None = None,
                 bias: torch.Tensor | None = None, backend: str = "auto", row_sets=None,
                 step_size=None) -> torch.Tensor:
    """Anchor-word steering of LM-head inputs (METHOD.md).

    hidden:    [..., d] fp32/fp16/bf16, the last hidden states (LM-head input).
    weight:    [V, d] LM-head weight, hidden's dtype and device. bias: optional [V].
    anchors:   an AnchorSet, or an AnchorBank with ``row_sets`` (one set index per row of
               hidden, shape hidden.shape[:-1] or flat; -1 leaves the row untouched), or
               ``prepare_anchors(weight, anchors)`` (what to pass inside torch.compile).
    step_size: optional per-row step in config's form (strength, or eta if set; as row_sets).
    backend:   "auto" (best for the device; env ANCHOR_KERNELS_BACKEND overrides),
               "reference" (fp64 oracle), "cpu", "cuda" or "triton".
    Returns a new tensor shaped and typed like hidden. Rows with a non-finite value in hidden
    have a non-finite gap, are never edited, and come back bit for bit. Differentiable in
    hidden, weight and bias (the backward recomputes the edit in eager K-space form).
    An AnchorSet/AnchorBank is packed against weight's current values on every call (no hidden
    cache); pass ``prepare_anchors(weight, anchors)`` to pack once.
    """
    config = SteerConfig() if config is None else config
    if not isinstance(config, SteerConfig):
        raise TypeError(f"config must be a SteerConfig, got {type(config).__name__}")
    _check_inputs(hidden, weight, bias)
    prepared = anchors if isinstance(anchors, PreparedAnchors) else None
    bank = None if prepared is not None else as_bank(anchors)
    if prepared is not None:
        prepared.check_weight(weight)
    num_sets = bank.num_sets if bank is not None else prepared.anchor_ids.shape[0]
    lead_shape, d = hidden.shape[:-1], hidden.shape[-1]
    name = resolve_backend(backend, hidden.device, math.prod(lead_shape),
                           bank.size if bank is not None else prepared.anchor_ids.shape[1], hidden.dtype)
    rows = _row_sets(row_sets, num_sets, lead_shape, hidden.device)
    eta = _step_size(step_size, config, lead_shape, hidden.device)
    h2 = hidden if hidden.dim() == 2 else hidden.reshape(-1, d)
    if name == "reference":
        bank = bank if bank is not None else prepared.to_bank()
        check_vocab(bank, weight.shape[0])
        check_finite_anchors(weight, torch.tensor([t for s in bank.sets for t in s.ids]), bias=bias)
        out = reference.steer_rows_fp64(h2, weight, bias, bank, rows, eta, config).to(hidden.dtype)
        return out.reshape(hidden.shape)
    if prepared is None:
        prepared = prepare_anchors(weight, bank)
    # The anchor rows of W were checked when the bank was packed (check_weight holds W to that
    # snapshot); per call only the bias, which the handle does not hold: a decode step stays cheap.
    if bias is not None:
        check_finite_anchors(None, prepared.anchor_ids, prepared.anchor_weights != 0, bias)
    if name == "triton":
        from .triton_steer import steer_hidden_triton as op
    else:
        op = torch.ops.anchor_kernels.steer_hidden
    args = (h2, weight, bias, *prepared.tensors, rows, eta, config.steps, config.objective,
            float(config.reg), float(config.temperature), config.margin_value,
            config.max_norm_value, config.relative_step, prepared.direction)
    if _needs_autograd(hidden, weight, bias):
        out = op(*args)
    else:  # decoding: skip the Python autograd wrapper the op would enter only to step past it
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
    return out if hidden.dim() == 2 else out.reshape(hidden.shape)


def _needs_autograd(*tensors) -> bool:
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return torch.compiler.is_compiling()
    return any(t is not None and t.requires_grad for t in tensors)
