"""Known-answer self-test of the GPU backends.

Before a GPU backend ("cuda", "triton") serves its first call on a device, per dtype and form
(the hidden-state op; the logit form, tested with the head's dtype when a ``LogitSteerer`` is
built), it steers two small fixed problems and must agree with the C++ CPU op (the fp64
reference where the extension is not built): one with two anchor sets (one padded) and an
untouched row, one of decode shape (3 rows, d = 600: the split-d plans; a set of 70 anchors: the
CUDA Gram read through L2), each under lse with a relative step and a trust region, and mean
(the rank-one form). Tolerance: 1e-3 (fp32) or 5e-2 (16-bit) of the edit plus twice the output
dtype's unit roundoff of the row (METHOD.md's 1e-4 / 2e-2 are against fp64; two kernels differ
by more); NaN or inf anywhere fails. A backend that fails, or whose launch raises, is broken on
that device, dtype and form for the life of the process: a warning says so once,
``backend="auto"`` takes the next backend, and an explicit ``backend=`` raises.

The test never runs while a CUDA graph is being captured or torch.compile traces, and a graph
captured or compiled then keeps the backend it chose: a model that is only ever run compiled
should call ``check(device)`` once, eagerly, first. ``ANCHOR_KERNELS_SELF_TEST=0`` turns it off.
"""
from __future__ import annotations

import math
import os
import threading
import warnings

import torch

SELF_TEST_ENV = "ANCHOR_KERNELS_SELF_TEST"
TESTED_BACKENDS = ("cuda", "triton")
# Relative error on the edit h' - h0 per row (METHOD.md: fp32 1e-4, 16-bit 2e-2), with room for
# the backends' different orders of summation.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}

_results: dict[tuple[str, str, torch.dtype, str], str | None] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(SELF_TEST_ENV, "1") != "0"


def _busy(device: torch.device) -> bool:
    """Whether a test cannot run now: tracing, or capturing a CUDA graph on this device."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def failure(backend: str, device: torch.device, dtype: torch.dtype, form: str = "hidden") -> str | None:
    """None if ``backend`` may serve ``dtype`` on ``device`` in ``form`` ("hidden" or "logits"): it
    passed, it is not a tested backend, the test is off, or it cannot run now. Else why not."""
    if backend not in TESTED_BACKENDS or not enabled() or dtype not in TOLERANCE:
        return None
    key = (backend, str(device), dtype, form)
    if key in _results:
        return _results[key]
    if _busy(device):
        return None
    with _lock:
        if key not in _results:
            why = (_run if form == "hidden" else _run_logits)(backend, device, dtype)
            _results[key] = why
            if why is not None:
                warnings.warn(f"anchor_kernels: backend {backend!r} failed its known-answer self-test on {device} "
                              f"for {dtype} ({form} form) and is not used there: {why}. backend='auto' takes the next "
                              f"backend; {SELF_TEST_ENV}=0 turns the test off", RuntimeWarning, stacklevel=3)
    return _results[key]


def check(device, dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> dict:
    """Runs every test for ``device`` now (eagerly): {(backend, dtype, form): None or why}."""
    device = torch.device(device)
    from .steer import unavailable_reason

    return {(b, dt, form): failure(b, device, dt, form) for b in TESTED_BACKENDS
            if unavailable_reason(b, device) is None for dt in dtypes for form in ("hidden", "logits")}


def forget() -> None:
    """Clears the recorded results (tests; a process that swapped its kernels)."""
    with _lock:
        _results.clear()


def _problems(dtype: torch.dtype):
    """(hidden, weight, bias, prepared, row_sets, step) of the two known-answer problems."""
    from .anchors import AnchorBank, AnchorSet, prepare_anchors

    gen = torch.Generator().manual_seed(20251129)
    out = []
    for rows, dim, vocab, bank, row_sets in (
            (6, 72, 48, AnchorBank([AnchorSet([1, 5, 9, 13], [2, 7, 11]), AnchorSet([20, 22], [30, 31, 33, 40, 41])]),
             [0, 1, -1, 1, 0, 1]),
            (3, 600, 96, AnchorBank([AnchorSet(list(range(0, 35)), list(range(35, 70))), AnchorSet([80], [90])]),
             [0, 1, 0])):
        weight = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5).to(dtype)
        bias = (0.1 * torch.randn(vocab, generator=gen)).to(dtype)
        hidden = (3 * torch.randn(rows, dim, generator=gen)).to(dtype)
        step = 0.01 + 0.04 * torch.rand(rows, generator=gen)
        out.append((hidden, weight, bias, prepare_anchors(weight, bank), torch.tensor(row_sets), step))
    return out


def _configs():
    from .config import SteerConfig

    return (SteerConfig(objective="lse", steps=4, strength=0.05, max_norm=0.2),
            SteerConfig(objective="mean", steps=3, eta=0.3, reg=0.1))


def _scalars(config):
    return (config.steps, config.objective, float(config.reg), float(config.temperature), config.margin_value,
            config.max_norm_value, config.relative_step)


def _edit_error(got: torch.Tensor, want: torch.Tensor, h0: torch.Tensor, row_sets: torch.Tensor,
                dtype: torch.dtype) -> float:
    """The worst row's ||got - want|| over what the tolerance allows: METHOD.md's relative error on
    the edit, plus the unit roundoff of writing h' in ``dtype`` (two sides may round apart)."""
    got, want, h0 = got.double(), want.double(), h0.double()
    roundoff = 2.0 * torch.finfo(dtype).eps
    worst = 0.0
    for r in range(h0.shape[0]):
        if row_sets[r] < 0:
            if not torch.equal(got[r], h0[r]):
                return float("inf")  # an untouched row must come back bit for bit
            continue
        allowed = TOLERANCE[dtype] * (want[r] - h0[r]).norm().item() + roundoff * want[r].norm().item()
        ratio = (got[r] - want[r]).norm().item() / allowed
        if not math.isfinite(ratio):
            return float("inf")  # NaN or inf in the answer (max() would skip a NaN)
        worst = max(worst, ratio)
    return worst


def _launch(backend: str, device: torch.device, call) -> str | None:
    """Runs ``call`` (a backend launch) insulated from the caller's warning filters (the CPU
    interpreter warns on masked lanes); a launch that raises is a failed test, not an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _compare(got, want, h0, row_sets, dtype, what: str) -> str | None:
    err = _edit_error(got, want, h0, row_sets, dtype)
    if err <= 1.0:
        return None
    return (f"{what}: the edit differs from the CPU op's by {err:.3g} times the tolerance "
            f"(relative {TOLERANCE[dtype]} plus the roundoff of {dtype})")


def _run(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    from . import native, reference

    if backend == "triton":
        from .triton_steer import steer_hidden_triton as op
    else:
        op = torch.ops.anchor_kernels.steer_hidden
    for n, (hidden, weight, bias, prepared, row_sets, step) in enumerate(_problems(dtype)):
        on = [t.to(device) for t in (hidden, weight, bias, *prepared.tensors, row_sets, step)]
        for config in _configs():
            what = f"problem {n}, {config.objective}"
            result = []
            failed = _launch(backend, device, lambda: result.append(op(*on, *_scalars(config)).cpu()))
            if failed:
                return f"{what}: {failed}"
            if native.available():
                want = torch.ops.anchor_kernels.steer_hidden(hidden, weight, bias, *prepared.tensors, row_sets, step,
                                                             *_scalars(config))
            else:
                want = reference.steer_rows_fp64(hidden, weight, bias, prepared.to_bank(), row_sets, step, config)
            failed = _compare(result[0], want, hidden, row_sets, dtype, what)
            if failed:
                return failed
    return None


def _run_logits(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    from . import native

    if not native.available():
        return None  # nothing to compare with: the logit form's CPU op is the extension's
    if backend == "triton":
        from .triton_steer import steer_logits_triton_ as op
    else:
        op = torch.ops.anchor_kernels.steer_logits_
    for n, (hidden, weight, bias, prepared, row_sets, step) in enumerate(_problems(dtype)):
        w32 = weight.float()
        live = (prepared.anchor_weights != 0).unsqueeze(-1)
        mixing = torch.where(live, w32[prepared.anchor_ids] @ w32.T, 0.0).contiguous()   # [S, K, V]
        logits = (hidden.float() @ w32.T + bias.float()).to(dtype)
        norm = hidden.float().norm(dim=-1)
        for config in _configs():
            what = f"logit form, problem {n}, {config.objective}"
            got = logits.to(device, copy=True)  # edited in place; logits stay the input
            on = [t.to(device) for t in (mixing, *prepared.tensors, row_sets, step, norm)]
            failed = _launch(backend, device, lambda: op(got, *on, *_scalars(config)))
            if failed:
                return f"{what}: {failed}"
            want = logits.clone()
            torch.ops.anchor_kernels.steer_logits_(want, mixing, *prepared.tensors, row_sets, step, norm,
                                                   *_scalars(config))
            failed = _compare(got.cpu(), want, logits, row_sets, dtype, what)
            if failed:
                return failed
    return None
