"""Shared test helpers. Without a GPU, Triton runs under its CPU interpreter."""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402

import anchor_kernels as ak  # noqa: E402
from anchor_kernels.steer import unavailable_reason  # noqa: E402

# The 4.3M-parameter fortune-cookie model (scripts/train_fortune_model.py): a small, fast test
# fixture, kept out of the package.
FORTUNE_MODEL = Path(__file__).resolve().parent / "fixtures" / "fortune"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Relative tolerance on h' - h0 (METHOD.md "Precision") and the unit roundoff of writing h'.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = list(TOLERANCE)


def kernel_backends(device=DEVICE):
    """Every non-reference backend, each skipped with its reason where it cannot run."""
    out = []
    for name in ("cpu", "cuda", "triton"):
        if name == "cuda" and device.type != "cuda":
            continue
        if name == "cpu" and device.type != "cpu":
            continue
        why = unavailable_reason(name, device)
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


def roundoff(dtype, backend=None):
    # Triton's CPU interpreter truncates fp32 -> bf16 casts (even with rounding="rtne"); GPUs
    # round to nearest even. Truncation costs up to a whole ulp instead of half of one.
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return 2.0**-7
    return ROUNDOFF[dtype]


def assert_steer_close(out, hidden, expected_fp64, dtype, backend=None):
    """Per row: ||(out - h0) - (ref - h0)|| <= tol ||ref - h0|| + roundoff(dtype) ||ref||.

    The second term is the unavoidable rounding of writing h' in ``dtype``."""
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    d = hidden.shape[-1]
    got = out.reshape(-1, d).double().cpu()
    ref = expected_fp64.reshape(-1, d).double().cpu()
    h0 = hidden.reshape(-1, d).double().cpu()
    err = (got - ref).norm(dim=-1)
    bound = TOLERANCE[dtype] * (ref - h0).norm(dim=-1) + roundoff(dtype, backend) * ref.norm(dim=-1) + 1e-30
    bad = (err > bound).nonzero().flatten().tolist()
    assert not bad, (f"{len(bad)} rows out of tolerance, first rows {bad[:5]}: "
                     f"err {err[bad[:5]].tolist()} > bound {bound[bad[:5]].tolist()}; "
                     f"|ref - h0| {(ref - h0).norm(dim=-1)[bad[:5]].tolist()}")


def reference_fp64(hidden, weight, anchors, config, bias=None, row_sets=None, step_size=None):
    """The fp64 oracle on the same (dtype-rounded) inputs, flattened to rows."""
    from anchor_kernels import reference
    from anchor_kernels.anchors import as_bank

    bank = as_bank(anchors)
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = rows.shape[0]
    rs = torch.zeros(n, dtype=torch.long) if row_sets is None else torch.as_tensor(row_sets).reshape(n)
    eta = (torch.full((n,), config.step_size) if step_size is None
           else torch.as_tensor(step_size, dtype=torch.float32).reshape(n))
    return reference.steer_rows_fp64(rows.cpu(), weight.cpu(), None if bias is None else bias.cpu(),
                                     bank, rs, eta.cpu(), config)


# The bank of the device-path tests: set 0 = anchors [1, 2, 5 | 3, 4] (1/3 each, 1/2 each), set 1 =
# [7 | 9], padded to K = 5.
DEVICE_BANK_IDS = [[1, 2, 5, 3, 4], [7, 9, 0, 0, 0]]
DEVICE_BANK_SIGNED = [[1 / 3] * 3 + [-0.5] * 2, [1.0, -1.0, 0, 0, 0]]


def device_packing(weight):
    """(ids, signed weights, Gram) of DEVICE_BANK_IDS packed straight from ``weight``, as a device
    caller passes them to the op: no host check, so a broken or out-of-range row reaches the kernel."""
    with torch.no_grad():
        ids = torch.tensor(DEVICE_BANK_IDS, device=weight.device)
        signed = torch.tensor(DEVICE_BANK_SIGNED, device=weight.device)
        rows = torch.where((signed != 0).unsqueeze(-1), weight[ids].double(), 0.0)
        return ids, signed, torch.bmm(rows, rows.transpose(1, 2)).float()
