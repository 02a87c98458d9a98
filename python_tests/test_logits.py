"""The fused logit-space op (anchor_kernels::steer_logits_) and LogitSteerer against the literal
reference: W h' + b with h' from the fp64 oracle, on fresh random inputs."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anchor_kernels as ak
from anchor_kernels import native
from conftest import DTYPES, TOLERANCE, reference_fp64, roundoff
from test_memory import LargestOutput

needs_op = pytest.mark.skipif(not native.available(), reason="anchor_kernels._C not built")


def _problem(seed, rows, d, vocab, sizes, dtype, bias):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, d, generator=g) * 2 / math.sqrt(d)).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    hidden = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    perm = torch.randperm(vocab, generator=g).tolist()
    sets, at = [], 0
    for p, n in sizes:
        sets.append(ak.AnchorSet(perm[at: at + p], perm[at + p: at + p + n]))
        at += p + n
    bank = ak.AnchorBank(sets)
    row_sets = torch.randint(-1, len(sets), (rows,), generator=g)
    return weight, b, hidden, bank, row_sets


def _check(out, raw, expected, dtype, backend=None):
    """Per row: ||(out - raw) - (expected - raw)|| <= tol ||expected - raw|| + roundoff ||expected||."""
    got, raw64, want = out.double(), raw.double(), expected.double()
    err = (got - want).norm(dim=-1)
    bound = TOLERANCE[dtype] * (want - raw64).norm(dim=-1) + 2 * roundoff(dtype, backend) * want.norm(dim=-1) + 1e-30
    assert bool((err <= bound).all()), (err, bound)


LOGIT_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=str(why)))
                  for b in ak.logits.LOGIT_BACKENDS for why in [ak.logits._unavailable(b, torch.device("cpu"))]]


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), d=st.sampled_from([8, 16, 40]),
       vocab=st.integers(30, 200), bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       config=st.builds(ak.SteerConfig, steps=st.sampled_from([0, 1, 4]), objective=st.sampled_from(["mean", "lse"]),
                        strength=st.floats(0.01, 0.05),
                        reg=st.sampled_from([0.0, 0.3]), margin=st.one_of(st.none(), st.floats(-1, 2)),
                        max_norm=st.one_of(st.none(), st.floats(0.01, 0.2))))
def test_matches_the_reference(backend, seed, rows, d, vocab, bias, dtype, config):
    weight, b, hidden, bank, row_sets = _problem(seed, rows, d, vocab, [(3, 2), (1, 4)], dtype, bias)
    raw = (hidden.double() @ weight.double().T + (0 if b is None else b.double())).to(dtype)
    steerer = ak.LogitSteerer(weight, bank, config, bias=b, backend=backend, with_hidden_norm=True)
    out = steerer(raw, row_sets=row_sets, hidden_norm=hidden.float().norm(dim=-1))
    ref_h = reference_fp64(hidden, weight, bank, config, bias=b, row_sets=row_sets)
    # the edit of the logits is W (h' - h0); raw logits carry their own rounding, so add it to raw
    expected = raw.double() + (ref_h - hidden.double()) @ weight.double().T
    _check(out, raw, expected, dtype, backend)
    untouched = row_sets == -1
    assert torch.equal(out[untouched], raw[untouched])


@pytest.mark.parametrize("backend", LOGIT_BACKENDS[:2])
def test_apply_is_in_place_and_unsteered_rows_are_not_read(backend):
    weight, _, hidden, bank, _ = _problem(0, 3, 16, 60, [(2, 2)], torch.float32, False)
    raw = hidden @ weight.T
    raw[1] = float("nan")                       # an unsteered row: never read, never written
    steerer = ak.LogitSteerer(weight, bank, ak.SteerConfig(eta=0.5, margin=None), backend=backend)
    logits = raw.clone()
    before = logits.data_ptr()
    out = steerer.apply_(logits, row_sets=[0, -1, 0])
    assert out is logits and logits.data_ptr() == before
    assert torch.equal(logits[1].isnan(), raw[1].isnan()) and not torch.equal(logits[0], raw[0])


@needs_op
def test_op_validates_its_arguments():
    weight, _, hidden, bank, _ = _problem(0, 2, 8, 30, [(2, 2)], torch.float32, False)
    steerer = ak.LogitSteerer(weight, bank, ak.SteerConfig(margin=None), with_hidden_norm=True)
    p = steerer.prepared
    args = lambda **o: dict(dict(logits=torch.zeros(2, 30), mixing=steerer.mixing, anchor_ids=p.anchor_ids,  # noqa: E731
                                 anchor_weights=p.anchor_weights, gram=p.gram, row_sets=torch.zeros(2, dtype=torch.long),
                                 step_size=torch.full((2,), 0.1), hidden_norm=None, steps=3, objective="lse", reg=0.0,
                                 temperature=1.0, margin=math.inf, max_norm=math.inf, relative_step=False), **o)
    op = torch.ops.anchor_kernels.steer_logits_
    for over, message in ((dict(mixing=torch.zeros(1, 4, 29)), "mixing must be"),
                          (dict(relative_step=True), "need hidden_norm"),
                          (dict(row_sets=torch.tensor([0, 3])), r"row_sets entries must be in \[-1, 1\)"),
                          (dict(logits=torch.zeros(2, 60)[:, ::2]), "unit stride"),
                          (dict(steps=10**6), r"steps must be in \[0, 10000\]"),
                          (dict(hidden_norm=torch.ones(3)), "hidden_norm has 3 entries")):
        with pytest.raises(RuntimeError, match=message):
            op(*args(**over).values())
    with pytest.raises(ValueError, match="need ..h0.."):
        steerer(torch.zeros(2, 30))


@pytest.mark.parametrize("backend", LOGIT_BACKENDS[1:2])
def test_triton_large_sets_and_bad_arguments(backend):
    """K = 200 takes the chunked Gram path; the op refuses what it cannot run, naming it."""
    g = torch.Generator().manual_seed(3)
    vocab, d = 700, 64
    weight = torch.randn(vocab, d, generator=g) / 8
    perm = torch.randperm(vocab, generator=g).tolist()
    bank = ak.AnchorBank([ak.AnchorSet(perm[:120], perm[120:200]), ak.AnchorSet(perm[200:203], perm[203:205])])
    hidden = torch.randn(5, d, generator=g) * 3
    config = ak.SteerConfig(steps=6, max_norm=0.1, margin=None)
    rows = torch.tensor([0, 1, -1, 0, 1])
    norm = hidden.norm(dim=-1)
    raw = hidden @ weight.T
    want = ak.LogitSteerer(weight, bank, config, backend="cpu", with_hidden_norm=True)(raw, row_sets=rows, hidden_norm=norm)
    got = ak.LogitSteerer(weight, bank, config, backend=backend, with_hidden_norm=True)(raw, row_sets=rows, hidden_norm=norm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    from anchor_kernels.triton_steer import steer_logits_triton_ as op
    steerer = ak.LogitSteerer(weight, bank, config, backend=backend, with_hidden_norm=True)
    p = steerer.prepared
    base = dict(logits=raw.clone(), mixing=steerer.mixing, anchor_ids=p.anchor_ids, anchor_weights=p.anchor_weights,
                gram=p.gram, row_sets=rows, step_size=torch.full((5,), 0.1), hidden_norm=norm, steps=3,
                objective="lse", reg=0.0, temperature=1.0, margin=math.inf, max_norm=0.1, relative_step=True)
    for over, message in ((dict(mixing=steerer.mixing[:, :, :-1]), "mixing must be"),
                          (dict(hidden_norm=None), "need hidden_norm"),
                          (dict(logits=raw.clone().to(torch.float64)), "logits must be"),
                          (dict(objective="max"), "objective must be")):
        with pytest.raises(RuntimeError, match=message):
            op(**{**base, **over})
    with pytest.raises(ValueError, match="backend must be"):
        ak.LogitSteerer(weight, bank, config, backend="cuda", with_hidden_norm=True)


def test_building_m_makes_no_fp32_copy_of_the_head():
    V, d = 50_000, 256
    weight = torch.randn(V, d, dtype=torch.bfloat16)
    anchors = ak.AnchorSet(list(range(32)), list(range(32, 64)))
    with LargestOutput() as mode:
        steerer = ak.LogitSteerer(weight, anchors, ak.SteerConfig(eta=0.003, margin=None))
    assert steerer.mixing.shape == (1, 64, V)
    assert mode.largest < V * d, mode.largest  # chunks of W only; M itself is V x K


def test_refuses_at_construction_a_config_it_cannot_run():
    """The relative step and max_norm need ||h0||: refused when the steerer is built, naming the field,
    not at the first generated token."""
    weight, _, _, bank, _ = _problem(0, 2, 8, 30, [(2, 2)], torch.float32, False)
    for config, field in ((ak.SteerConfig(margin=None), r"SteerConfig\.strength=0\.01 \(the relative step\)"),
                          (ak.SteerConfig(eta=0.003, max_norm=0.1, margin=None), r"SteerConfig\.max_norm=0\.1"),
                          (ak.SteerConfig(max_norm=0.2, margin=None), r"relative step\) and SteerConfig\.max_norm=0\.2")):
        with pytest.raises(ValueError, match=field):
            ak.LogitSteerer(weight, bank, config)
        ak.LogitSteerer(weight, bank, config, with_hidden_norm=True)
    ak.LogitSteerer(weight, bank, ak.SteerConfig(eta=0.003, margin=None))


def test_hf_processor_refuses_a_steerer_that_needs_hidden_norm():
    weight, _, _, bank, _ = _problem(0, 2, 8, 30, [(2, 2)], torch.float32, False)
    steerer = ak.LogitSteerer(weight, bank, ak.SteerConfig(margin=None), with_hidden_norm=True)
    with pytest.raises(ValueError, match=r"AnchorLogitsProcessor cannot give .* SteerConfig\.strength=0\.01"):
        ak.hf.AnchorLogitsProcessor(steerer)
    ak.hf.AnchorLogitsProcessor(ak.LogitSteerer(weight, bank, ak.SteerConfig(eta=0.003, margin=None)))


@pytest.mark.parametrize("backend, compiler", [pytest.param("cpu", "inductor", marks=needs_op), ("eager", "aot_eager")])
def test_compiles_with_fullgraph(backend, compiler):
    weight, _, hidden, bank, rows = _problem(5, 4, 16, 120, [(3, 2), (2, 2)], torch.float32, False)
    steerer = ak.LogitSteerer(weight, bank, ak.SteerConfig(max_norm=0.1, margin=None), backend=backend, with_hidden_norm=True)
    compiled = torch.compile(steerer, fullgraph=True, backend=compiler)
    raw, norm = hidden @ weight.T, hidden.norm(dim=-1)
    strided = raw.t().contiguous().t()                    # not contiguous: the steered copy is written back
    for logits in (raw, strided):
        got = compiled(logits, row_sets=rows, hidden_norm=norm)
        torch.testing.assert_close(got, steerer(logits, row_sets=rows, hidden_norm=norm), rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, raw)


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("head, mixing", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), vocab=st.integers(30, 200), bias=st.booleans())
def test_mixing_in_its_own_dtype_matches_the_reference(backend, head, mixing, seed, rows, vocab, bias):
    """M may be kept in fp32, fp16 or bf16 whatever the logits' dtype (the apply widens it): a 16-bit
    M holds the edit to the 16-bit tolerance, an fp32 M to the head's."""
    weight, b, hidden, bank, row_sets = _problem(seed, rows, 24, vocab, [(3, 2), (1, 4)], head, bias)
    config = ak.SteerConfig(steps=4, strength=0.03, margin=None)
    raw = (hidden.double() @ weight.double().T + (0 if b is None else b.double())).to(head)
    steerer = ak.LogitSteerer(weight, bank, config, bias=b, backend=backend, with_hidden_norm=True, mixing_dtype=mixing)
    assert steerer.mixing.dtype == mixing
    out = steerer(raw, row_sets=row_sets, hidden_norm=hidden.float().norm(dim=-1))
    ref_h = reference_fp64(hidden, weight, bank, config, bias=b, row_sets=row_sets)
    expected = raw.double() + (ref_h - hidden.double()) @ weight.double().T
    coarser = mixing if mixing != torch.float32 else head
    _check(out.to(head), raw, expected, coarser if head == torch.float32 else head, backend)


def test_mixing_dtype_default_follows_the_head_where_it_fits():
    anchors = ak.AnchorSet([1, 2], [3])
    small = torch.randn(40, 16) / 4
    assert ak.LogitSteerer(small, anchors, ak.SteerConfig(eta=0.1)).mixing.dtype == torch.float32
    assert ak.LogitSteerer(small.bfloat16(), anchors, ak.SteerConfig(eta=0.1)).mixing.dtype == torch.bfloat16
    assert ak.LogitSteerer(small.half(), anchors, ak.SteerConfig(eta=0.1)).mixing.dtype == torch.float16
    # rows of norm ~400: M's entries could reach 1.6e5, past fp16's 65504, so M stays fp32
    big = small.clone()
    big[5] *= 1600
    assert ak.LogitSteerer(big.half(), anchors, ak.SteerConfig(eta=0.1)).mixing.dtype == torch.float32
    with pytest.raises(TypeError, match="mixing_dtype must be"):
        ak.LogitSteerer(small, anchors, ak.SteerConfig(eta=0.1), mixing_dtype=torch.float64)


@needs_op
def test_op_refuses_a_mixing_matrix_of_another_type():
    weight = torch.randn(30, 8)
    steerer = ak.LogitSteerer(weight, ak.AnchorSet([1, 2], [3]), ak.SteerConfig(eta=0.1, margin=None))
    p = steerer.prepared
    with pytest.raises(RuntimeError, match="mixing must be float32, float16 or bfloat16"):
        torch.ops.anchor_kernels.steer_logits_(torch.zeros(2, 30), steerer.mixing.double(), *p.tensors,
                                               torch.zeros(2, dtype=torch.long), torch.full((2,), 0.1), None, 2,
                                               "lse", 0.0, 1.0, math.inf, math.inf, False)


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_of_many_rows_and_sets_matches_the_reference(backend, dtype):
    """Past 16 rows with several sets, the Triton apply sorts rows by set and adds one GEMM per
    (16-row tile, set): rows of every set, unsteered rows among them, a partial last tile."""
    weight, b, hidden, bank, _ = _problem(7, 37, 24, 90, [(3, 2), (1, 4), (2, 2)], dtype, True)
    row_sets = torch.tensor([(5 * i) % 4 - 1 for i in range(37)])
    config = ak.SteerConfig(steps=4, strength=0.03, margin=None)
    raw = (hidden.double() @ weight.double().T + b.double()).to(dtype)
    steerer = ak.LogitSteerer(weight, bank, config, bias=b, backend=backend, with_hidden_norm=True)
    out = steerer(raw, row_sets=row_sets, hidden_norm=hidden.float().norm(dim=-1))
    ref_h = reference_fp64(hidden, weight, bank, config, bias=b, row_sets=row_sets)
    _check(out, raw, raw.double() + (ref_h - hidden.double()) @ weight.double().T, dtype, backend)
    assert torch.equal(out[row_sets == -1], raw[row_sets == -1])
