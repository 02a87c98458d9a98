"""fp32's range (issue 20, items 6 and 9): no silent wrong answer at the edges of float32.

Hidden states near 1e20 or 1e-25, anchor rows from ~1e-11 to ~1e15 (Gram entries up to ~1e30) and
literal steps up to FLT_MAX under a trust region give the fp64 reference's edit in every backend:
the kernels scale by powers of two before they square (||h0||, ||u||) and before they form a
quadratic form of the Gram (the trust region's ||h - h0||, the relative step's ||grad G||). Where
fp32 cannot represent the problem (an anchor row whose squared norm the fp32 Gram cannot hold; a
step whose edit overflows fp32) the rows come back untouched, bit for bit, on the device path,
and the host refuses the anchors naming the tokens: never inf, NaN or a silently dropped edit.
The CUDA kernels get the same cases from csrc/tests/steer_test.cpp (``make cuda-emu``)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import anchor_kernels as ak
from anchor_kernels import kspace, reference
from anchor_kernels.steer import unavailable_reason
from conftest import DEVICE, assert_steer_close, device_packing, kernel_backends, reference_fp64

A = ak.AnchorSet([1, 2, 5], [3, 4])
FP32_MAX = torch.finfo(torch.float32).max
BACKENDS = [pytest.param("reference")] + kernel_backends()


def _case(seed=0, rows=4, d=24, vocab=40, hidden_scale=1.0, weight_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, d, generator=g, dtype=torch.float64) / math.sqrt(d) * weight_scale).float()
    hidden = (torch.randn(rows, d, generator=g, dtype=torch.float64) * 3 * hidden_scale).float()
    return hidden.to(DEVICE), weight.to(DEVICE)


def _hidden_op(backend):
    if backend == "triton":
        from anchor_kernels.triton_steer import steer_hidden_triton
        return steer_hidden_triton
    return torch.ops.anchor_kernels.steer_hidden


def _config(objective, relative, step, max_norm, steps=4):
    """Every row edited at every step (margin=None), the step relative (strength) or literal (eta)."""
    return ak.SteerConfig(steps=steps, objective=objective, max_norm=max_norm, margin=None,
                          **({"strength": step} if relative else {"eta": step}))


def _check(backend, hidden, weight, config, bias=None):
    out = ak.steer_hidden(hidden, weight, A, config, bias=bias, backend=backend)
    ref = reference_fp64(hidden, weight, A, config, bias=bias)
    assert torch.isfinite(out).all()
    assert_steer_close(out, hidden, ref, torch.float32, backend)
    assert not torch.equal(out, hidden), "the reference edits these rows"
    if config.max_norm is not None:  # the trust region holds, in fp64 of the fp32 answer
        moved = (out.double().cpu() - hidden.double().cpu()).norm(dim=-1)
        assert bool((moved <= config.max_norm * hidden.double().cpu().norm(dim=-1) * (1 + 1e-4)).all())
    return out


# --- item 9: ||h0||, ||u|| and the Gram's quadratic forms, scaled before squaring ------------------

@pytest.mark.parametrize("objective", ["lse", "mean"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("hidden_scale", [1e20, 1e-25, 1e30, 1e-33])
@pytest.mark.parametrize("backend", kernel_backends())
def test_hidden_states_near_the_ends_of_fp32_are_steered(backend, hidden_scale, max_norm, objective):
    """||h0||^2 overflows (1e20: ~1e42) or underflows (1e-25: ~1e-50) fp32: the relative step and
    the trust region used to leave the rows untouched (C++) or do something else (Triton) while
    the reference edits them."""
    hidden, weight = _case(hidden_scale=hidden_scale)
    _check(backend, hidden, weight, _config(objective, True, 0.02, max_norm))


@pytest.mark.parametrize("objective", ["lse", "mean"])
@pytest.mark.parametrize("weight_scale", [1e15, 1e-11])
@pytest.mark.parametrize("backend", kernel_backends())
def test_anchor_rows_near_the_ends_of_the_grams_range_are_steered(backend, weight_scale, objective):
    """Gram entries ~1e30 (the quadratic forms of the relative step and the trust region, and
    ||u||^2 of the rank-one form, overflow unscaled) or ~1e-22."""
    hidden, weight = _case(weight_scale=weight_scale)
    _check(backend, hidden, weight, _config(objective, True, 0.02, 0.05))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# found by this test (Triton; the C++ kernels at larger K): (eta ||h0||) / ||grad|| 2^x overflowed
@example(seed=0, hidden_exp=85, weight_exp=-35, objective="lse", max_norm=None, strength=0.0625, steps=1)
@given(seed=st.integers(0, 2**16), hidden_exp=st.integers(-85, 90), weight_exp=st.integers(-35, 50),
       objective=st.sampled_from(["lse", "mean"]), max_norm=st.sampled_from([None, 0.01, 0.3]),
       strength=st.floats(1e-3, 0.1), steps=st.integers(1, 5))
@pytest.mark.parametrize("backend", kernel_backends())
def test_power_of_two_scalings_match_the_reference(backend, seed, hidden_exp, weight_exp, objective, max_norm,
                                                   strength, steps):
    """Hidden rows scaled by 2^-85..2^90 and anchor rows by 2^-35..2^50 (within the Gram's range),
    the relative step with and without a trust region: the reference's edit to fp32 tolerance.
    The anchor logits z = W_A h0 must themselves be finite in fp32 (as the model's own logits):
    past 2^128 the gap cannot be evaluated and the row is frozen, so products past 2^110 are not
    drawn."""
    assume(hidden_exp + weight_exp <= 110)
    hidden, weight = _case(seed, hidden_scale=2.0**hidden_exp, weight_scale=2.0**weight_exp)
    config = _config(objective, True, strength, max_norm, steps)
    out = ak.steer_hidden(hidden, weight, A, config, backend=backend)
    assert torch.isfinite(out).all()
    assert_steer_close(out, hidden, reference_fp64(hidden, weight, A, config), torch.float32, backend)


@pytest.mark.parametrize("plan", ["tiled", "split_d"])
@pytest.mark.parametrize("hidden_scale", [1e20, 1e-25])
def test_triton_plans_scale_the_norm(monkeypatch, plan, hidden_scale):
    """The split-d plan sums ||h0||^2 from slices: a sum out of range is recomputed over the row."""
    why = unavailable_reason("triton", DEVICE)
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("ANCHOR_KERNELS_TRITON_PLAN", plan)
    hidden, weight = _case(rows=3, d=600, hidden_scale=hidden_scale)
    _check("triton", hidden, weight, _config("lse", True, 0.02, 0.05))


@pytest.mark.parametrize("backend", kernel_backends())
def test_large_sets_scale_their_quadratic_forms(backend):
    """K = 129: Triton applies the Gram in chunks; the scaled c goes through its scratch."""
    g = torch.Generator().manual_seed(1)
    vocab, d = 300, 32
    weight = (torch.randn(vocab, d, generator=g) / math.sqrt(d) * 1e12).to(DEVICE)
    hidden = (torch.randn(3, d, generator=g) * 1e-20).to(DEVICE)
    big = ak.AnchorSet(list(range(0, 65)), list(range(100, 164)))
    config = _config("lse", True, 0.02, 0.05)
    out = ak.steer_hidden(hidden, weight, big, config, backend=backend)
    assert_steer_close(out, hidden, reference_fp64(hidden, weight, big, config), torch.float32, backend)


# --- item 6: huge steps under a trust region --------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), eta=st.one_of(st.sampled_from([1e20, 1e30, 3e38, FP32_MAX]),
                                                  st.floats(1e15, FP32_MAX)),
       objective=st.sampled_from(["lse", "mean"]), max_norm=st.floats(1e-3, 1.0),
       hidden_exp=st.sampled_from([0, -83, 66]), steps=st.integers(1, 5))
@pytest.mark.parametrize("backend", kernel_backends())
def test_huge_steps_are_projected_onto_the_trust_region(backend, seed, eta, objective, max_norm, hidden_exp,
                                                        steps):
    """eta >= 1e15 (up to FLT_MAX) with a trust region: c^T Gm c overflowed fp32 and the edit became
    0 or inf; now ||h' - h0|| = rho ||h0|| along the reference's direction."""
    hidden, weight = _case(seed, hidden_scale=2.0**hidden_exp)
    _check(backend, hidden, weight, _config(objective, False, eta, max_norm, steps))


@pytest.mark.parametrize("objective", ["lse", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_fp32_cannot_hold_leaves_the_rows_untouched(backend, objective):
    """eta = 3e38 without a trust region: the fp64 answer is past FLT_MAX. Every kernel leaves the
    rows untouched, bit for bit (never inf or NaN); the reference's own answer is not finite in fp32."""
    hidden, weight = _case()
    config = _config(objective, False, 3e38, None)
    out = ak.steer_hidden(hidden, weight, A, config, backend=backend)
    if backend == "reference":
        assert not torch.isfinite(out).all()   # what fp32 would have to hold
        return
    assert torch.equal(out, hidden)


@pytest.mark.parametrize("objective", ["lse", "mean"])
@pytest.mark.parametrize("backend", kernel_backends())
def test_a_step_whose_regulariser_overflows_is_untouched_or_right(backend, objective):
    """eta lambda c past FLT_MAX (eta = 1e30, lambda = 1e10, a trust region): the K-space step itself
    cannot be represented. Every row is either left untouched, bit for bit, or the reference's edit;
    never inf or NaN."""
    hidden, weight = _case()
    config = ak.SteerConfig(steps=4, eta=1e30, reg=1e10, max_norm=0.05, objective=objective, margin=None)
    out = ak.steer_hidden(hidden, weight, A, config, backend=backend)
    ref = reference_fp64(hidden, weight, A, config)
    assert torch.isfinite(out).all()
    for r in range(hidden.shape[0]):
        if not torch.equal(out[r], hidden[r]):
            assert_steer_close(out[r:r + 1], hidden[r:r + 1], ref[r:r + 1], torch.float32, backend)


# --- the Gram's own range: refused on the host, untouched on the device path -------------------------

@pytest.mark.parametrize("weight_scale", [1e20, 1e-15])
@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_rows_the_fp32_gram_cannot_hold_are_refused(backend, weight_scale):
    """||W_a||^2 past FLT_MAX (weights x1e20: Gram entries ~1e40) or nonzero below 2^-80: an error
    naming the tokens and the argument, in every backend and for the logit form, not a silent
    no-op (the reference would edit)."""
    if DEVICE.type != "cpu":
        pytest.skip("checked on the host only (a device check would sync); the next test covers the device")
    hidden, weight = _case(weight_scale=weight_scale)
    match = r"weight's rows for anchor token ids \[1, 2, 3, 4, 5\] have squared norms .* fp32 Gram"
    with pytest.raises(ValueError, match=match):
        ak.steer_hidden(hidden, weight, A, ak.SteerConfig(steps=3, margin=None), backend=backend)
    with pytest.raises(ValueError, match=match):
        ak.prepare_anchors(weight, A)
    with pytest.raises(ValueError, match=match):
        ak.LogitSteerer(weight, A, ak.SteerConfig(eta=0.1, margin=None), backend="eager")


@pytest.mark.parametrize("weight_scale", [1e20, 1e-15])
@pytest.mark.parametrize("objective, relative", [("lse", False), ("lse", True), ("mean", False), ("mean", True)])
@pytest.mark.parametrize("backend", kernel_backends())
def test_device_path_leaves_sets_the_gram_cannot_hold_untouched(backend, objective, relative, weight_scale):
    """What the device path does unchecked: the rows of such a set come back bit for bit in every
    kernel and in the oracle; the rows of a healthy set in the same launch are steered."""
    hidden, weight = _case(rows=6)
    scaled = weight.clone()
    scaled[[1, 2, 5, 3, 4]] *= weight_scale
    bank = ak.AnchorBank([A, ak.AnchorSet([7], [9])])
    row_sets = torch.tensor([0, 1, 0, 1, 0, 1], device=DEVICE)
    config = _config(objective, relative, 0.05 if relative else 0.5, None, steps=3)
    ids, signed, gram = device_packing(scaled)
    out = _hidden_op(backend)(hidden, scaled, None, ids, signed, gram, row_sets,
                              torch.full((6,), config.step_size, device=DEVICE), 3, objective, 0.0, 1.0,
                              math.inf, math.inf, relative)
    expected = reference.steer_rows_fp64(hidden.cpu(), scaled.cpu(), None, bank, row_sets.cpu(),
                                         torch.full((6,), config.step_size), config)
    assert torch.equal(out[0::2], hidden[0::2]) and torch.equal(expected[0::2].float(), hidden[0::2].cpu())
    assert_steer_close(out[1::2], hidden[1::2], expected[1::2], torch.float32, backend)


# --- the logit form and the eager K-space loop ------------------------------------------------------

LOGIT_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=str(why)))
                  for b in ak.logits.LOGIT_BACKENDS for why in [ak.logits._unavailable(b, DEVICE)]]


@pytest.mark.parametrize("case", ["hidden x1e20", "hidden x1e-25", "eta 3e38", "weight x1e15"])
@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
def test_logit_form_at_the_ends_of_fp32(backend, case):
    """The logit form's K-space loop (its ||h0|| comes from the caller, here in fp64)."""
    hidden, weight = _case(hidden_scale={"hidden x1e20": 1e20, "hidden x1e-25": 1e-25}.get(case, 1.0),
                           weight_scale=1e15 if case == "weight x1e15" else 1.0)
    config = _config("lse", case != "eta 3e38", 3e38 if case == "eta 3e38" else 0.02, 0.05)
    raw = (hidden.double() @ weight.double().T).float()
    steerer = ak.LogitSteerer(weight, A, config, backend=backend, with_hidden_norm=True)
    out = steerer(raw, hidden_norm=hidden.double().norm(dim=-1).float())
    ref_h = reference_fp64(hidden, weight, A, config)
    expected = raw.double().cpu() + (ref_h - hidden.double().cpu()) @ weight.double().cpu().T
    err = (out.double().cpu() - expected).norm(dim=-1)
    bound = 2e-4 * (expected - raw.double().cpu()).norm(dim=-1) + 2 * 2.0**-24 * expected.norm(dim=-1)
    assert torch.isfinite(out).all() and bool((err <= bound).all()), (err, bound)
    assert not torch.equal(out, raw)


@pytest.mark.parametrize("hidden_scale", [1e20, 1e-25])
def test_the_backward_recomputes_the_same_edit(hidden_scale):
    """The ops' backward differentiates kspace.steer_rows_differentiable: at the ends of fp32 it must
    recompute the edit the kernels made (robust ||h0||, scaled quadratic forms)."""
    hidden, weight = _case(hidden_scale=hidden_scale)
    hidden, weight = hidden.cpu(), weight.cpu()
    config = _config("lse", True, 0.02, 0.05)
    prepared = ak.prepare_anchors(weight, A)
    rows = torch.zeros(hidden.shape[0], dtype=torch.long)
    out = kspace.steer_rows_differentiable(hidden, weight, None, prepared.anchor_ids, prepared.anchor_weights,
                                           rows, torch.full((hidden.shape[0],), 0.02), config)
    assert_steer_close(out, hidden, reference_fp64(hidden, weight, A, config), torch.float32)
    assert torch.allclose(kspace.robust_norm(hidden), hidden.double().norm(dim=-1).float(), rtol=1e-6)


@pytest.mark.parametrize("K", [5, 200])
@pytest.mark.parametrize("backend", kernel_backends())
def test_relative_step_near_fp32s_top_is_not_lost_to_an_intermediate(backend, K):
    """Hidden rows near 2^88 and anchor rows near 2^-35: the relative step (~2^119) is representable,
    but eta ||h0|| / ||grad G|| 2^x (the scaled quadratic form's root) was not, so rows were left
    untouched. Every kernel scales ||h0|| by 2^-x before dividing; the scaling grows with K."""
    g = torch.Generator().manual_seed(3)
    d, vocab = 256, 400
    weight = (torch.randn(vocab, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 2.0**-35).float().to(DEVICE)
    hidden = (torch.randn(4, d, generator=g, dtype=torch.float64) * 2.0**85).float().to(DEVICE)
    anchors = ak.AnchorSet(list(range(K // 2)), list(range(K // 2, K)))
    config = _config("lse", True, 0.0625, None, 1)
    out = ak.steer_hidden(hidden, weight, anchors, config, backend=backend)
    assert (out != hidden).any(dim=-1).all()
    assert_steer_close(out, hidden, reference_fp64(hidden, weight, anchors, config), torch.float32, backend)
