"""Known-answer self-test of the GPU backends.

Before a GPU backend ("cuda", "triton") serves its first call on a device, per dtype, it steers a
small fixed problem (two anchor sets, one padded; an untouched row; lse with a relative step and
a trust region, and mean, which takes the CUDA rank-one form) and must agree with the C++ CPU
op (the fp64 reference where the extension is not built) within METHOD.md's tolerances. A
backend that fails is broken on that device and dtype for the life of the process: a warning
says so once, ``backend="auto"`` takes the next backend, and an explicit ``backend=`` raises.

The test never runs while a CUDA graph is being captured or torch.compile traces (the next eager
call runs it). ``ANCHOR_KERNELS_SELF_TEST=0`` turns it off.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

SELF_TEST_ENV = "ANCHOR_KERNELS_SELF_TEST"
TESTED_BACKENDS = ("cuda", "triton")
# Relative error on the edit h' - h0 per row (METHOD.md: fp32 1e-4, 16-bit 2e-2), with room for
# the backends' different orders of summation.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}

_results: dict[tuple[str, str, torch.dtype], str | None] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(SELF_TEST_ENV, "1") != "0"


def _busy(device: torch.device) -> bool:
    """Whether a test cannot run now: tracing, or capturing a CUDA graph on this device."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def failure(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` may serve ``dtype`` on ``device`` (it passed, it is not a tested backend,
    the test is off, or it cannot run now), else why it is broken there."""
    if backend not in TESTED_BACKENDS or not enabled() or dtype not in TOLERANCE:
        return None
    key = (backend, str(device), dtype)
    if key in _results:
        return _results[key]
    if _busy(device):
        return None
    with _lock:
        if key not in _results:
            why = _run(backend, device, dtype)
            _results[key] = why
            if why is not None:
                warnings.warn(f"anchor_kernels: backend {backend!r} failed its known-answer self-test on {device} "
                              f"for {dtype} and is not used there: {why}. backend='auto' takes the next backend; "
                              f"{SELF_TEST_ENV}=0 turns the test off", RuntimeWarning, stacklevel=3)
    return _results[key]


def forget() -> None:
    """Clears the recorded results (tests; a process that swapped its kernels)."""
    with _lock:
        _results.clear()


def _problem(dtype: torch.dtype):
    from .anchors import AnchorBank, AnchorSet, prepare_anchors

    gen = torch.Generator().manual_seed(20251129)
    rows, dim, vocab = 6, 72, 48
    weight = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5).to(dtype)
    bias = (0.1 * torch.randn(vocab, generator=gen)).to(dtype)
    hidden = (3 * torch.randn(rows, dim, generator=gen)).to(dtype)
    bank = AnchorBank([AnchorSet([1, 5, 9, 13], [2, 7, 11]), AnchorSet([20, 22], [30, 31, 33, 40, 41])])
    row_sets = torch.tensor([0, 1, -1, 1, 0, 1])
    step = torch.tensor([0.02, 0.05, 0.03, 0.01, 0.04, 0.02])
    return hidden, weight, bias, prepare_anchors(weight, bank), row_sets, step


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
        worst = max(worst, (got[r] - want[r]).norm().item() / allowed)
    return worst


def _run(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    from . import native, reference
    from .config import SteerConfig

    hidden, weight, bias, prepared, row_sets, step = _problem(dtype)
    configs = (SteerConfig(objective="lse", steps=4, relative_step=True, step_size=0.05, max_norm=0.2),
               SteerConfig(objective="mean", steps=3, relative_step=False, step_size=0.3, reg=0.1))
    if backend == "triton":
        from .triton_steer import steer_hidden_triton as op
    else:
        op = torch.ops.anchor_kernels.steer_hidden
    on = [t.to(device) for t in prepared.tensors]
    for config in configs:
        scalars = (config.steps, config.objective, float(config.reg), float(config.temperature), config.margin_value,
                   config.max_norm_value, config.relative_step)
        try:
            # insulated from the caller's warning filters (the CPU interpreter warns on masked lanes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = op(hidden.to(device), weight.to(device), bias.to(device), *on, row_sets.to(device),
                         step.to(device), *scalars).cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except Exception as exc:  # a launch failure is a failed test, not the caller's error
            return f"{config.objective}: {type(exc).__name__}: {exc}"
        if native.available():
            want = torch.ops.anchor_kernels.steer_hidden(hidden, weight, bias, *prepared.tensors, row_sets, step,
                                                         *scalars)
        else:
            want = reference.steer_rows_fp64(hidden, weight, bias, prepared.to_bank(), row_sets, step, config)
        err = _edit_error(got, want, hidden, row_sets, dtype)
        if not err <= 1.0:
            return (f"{config.objective}: the edit differs from the CPU op's by {err:.3g} times the tolerance "
                    f"(relative {TOLERANCE[dtype]} plus the roundoff of {dtype})")
    return None
