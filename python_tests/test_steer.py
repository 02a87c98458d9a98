"""Every backend against the literal fp64 reference of METHOD.md, on fresh random inputs."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anchor_kernels as ak
from anchor_kernels.steer import unavailable_reason
from conftest import DEVICE, DTYPES, assert_steer_close, kernel_backends, reference_fp64

# Interpreted Triton is ~100x slower than the C++ kernel: fewer examples keep CI fast.
EXAMPLES = {"cpu": 60, "cuda": 60, "triton": 15}


@st.composite
def steering_cases(draw, objectives=("mean", "lse")):
    """Sizes, anchor bank, config and layout of one call; tensors come from ``seed``."""
    num_sets = draw(st.integers(1, 3))
    relative = draw(st.booleans())
    sizes = [(draw(st.integers(1, 4)), draw(st.integers(1, 4))) for _ in range(num_sets)]
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        lead=draw(st.sampled_from([(1,), (2,), (5,), (19,), (2, 3), (3, 1, 2)])),
        # d >= K: with more anchors than dimensions the anchor rows are linearly dependent, the
        # edit is a cancelling sum, and the fp32 Gram of the K-space form loses accuracy in
        # proportion (an ill-conditioned regime no real model is in: K << d; d = 1 and K = 2 are
        # covered by test_smallest_shapes).
        d=draw(st.sampled_from([d for d in (1, 3, 8, 13, 37, 64, 130) if d >= max(p + n for p, n in sizes)])),
        vocab=draw(st.integers(max(sum(p + n for p, n in sizes), 8), 90)),
        sizes=sizes,
        custom_weights=draw(st.booleans()),
        config=ak.SteerConfig(
            steps=draw(st.sampled_from([0, 1, 2, 5, 8])),
            **{"strength" if relative else "eta": draw(st.floats(0.05, 1.0)) * (0.05 if relative else 1.0)},
            objective=draw(st.sampled_from(objectives)),
            reg=draw(st.sampled_from([0.0, 0.1, 0.7])),
            temperature=draw(st.sampled_from([0.5, 1.0, 2.5])),
            margin=draw(st.one_of(st.none(), st.floats(-2.0, 3.0))),
            max_norm=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        ),
        bias=draw(st.sampled_from([False, True, "strided"])),  # strided: Triton read it as contiguous
        per_row_eta=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "padded_rows", "strided_d"])),
    )


def build_case(case, dtype, device=DEVICE):
    g = torch.Generator().manual_seed(case["seed"])
    d, vocab = case["d"], case["vocab"]
    weight = (torch.randn(vocab, d, generator=g) * 2 / math.sqrt(d)).to(dtype)
    bias = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if case["bias"] else None
    if case["bias"] == "strided":
        bias = torch.stack([bias, torch.zeros_like(bias)], -1).flatten()[::2]
    perm = torch.randperm(vocab, generator=g).tolist()
    sets, at = [], 0
    for p, n in case["sizes"]:
        ids = perm[at: at + p + n]
        at += p + n
        pw = torch.rand(p, generator=g).add(0.1).tolist() if case["custom_weights"] else None
        nw = torch.rand(n, generator=g).add(0.1).tolist() if case["custom_weights"] else None
        sets.append(ak.AnchorSet(ids[:p], ids[p:], pw, nw))
    anchors = sets[0] if len(sets) == 1 else ak.AnchorBank(sets)
    lead = case["lead"]
    rows = math.prod(lead)
    if case["layout"] == "padded_rows":  # unit stride along d, rows further apart
        hidden = (torch.randn(*lead, d + 5, generator=g) * 3)[..., :d]
    elif case["layout"] == "strided_d":  # non-unit stride along d
        hidden = (torch.randn(*lead, 2 * d, generator=g) * 3)[..., ::2]
    else:
        hidden = torch.randn(*lead, d, generator=g) * 3
    hidden = hidden.to(dtype)
    row_sets = (torch.randint(-1, len(sets), lead, generator=g) if len(sets) > 1 else None)
    step_size = (torch.rand(rows, generator=g) * case["config"].step_size if case["per_row_eta"] else None)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(hidden=to(hidden), weight=to(weight), bias=to(bias), anchors=anchors,
                row_sets=to(row_sets), step_size=to(step_size), config=case["config"])


def check_against_reference(backend, dtype, case):
    args = build_case(case, dtype)
    out = ak.steer_hidden(args["hidden"], args["weight"], args["anchors"], args["config"],
                          bias=args["bias"], backend=backend, row_sets=args["row_sets"],
                          step_size=args["step_size"])
    expected = reference_fp64(**args)
    assert_steer_close(out, args["hidden"], expected, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
def test_matches_reference(backend, dtype):
    @settings(max_examples=EXAMPLES[backend], deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=steering_cases())
    def run(case):
        check_against_reference(backend, dtype, case)

    run()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
def test_mean_direction_prepared_or_computed_matches_reference(backend, dtype):
    """objective="mean" is rank one: steer_hidden hands the kernels u = W_A^T w, which
    prepare_anchors computed once (no per-call pass over the K anchor rows); without it (a direct
    op call, direction=None) the kernels compute u themselves. Both against the fp64 reference,
    with and without a bias (w.b_A is summed in the row kernel on every call)."""
    @settings(max_examples=max(4, EXAMPLES[backend] // 3), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=steering_cases(objectives=("mean",)))
    def run(case):
        args = build_case(case, dtype)
        prepared = ak.prepare_anchors(args["weight"], args["anchors"])
        assert prepared.direction.shape == (prepared.anchor_ids.shape[0], args["hidden"].shape[-1])
        expected = reference_fp64(**args)
        for anchors in (prepared, prepared._replace(direction=None)):
            out = ak.steer_hidden(args["hidden"], args["weight"], anchors, args["config"], bias=args["bias"],
                                  backend=backend, row_sets=args["row_sets"], step_size=args["step_size"])
            assert_steer_close(out, args["hidden"], expected, dtype, backend)

    run()


@pytest.mark.parametrize("backend", kernel_backends())
def test_mean_kernels_use_the_prepared_direction(backend):
    """Given 2u for u = W_A^T w, an ungated literal mean edit (a_T = T eta whatever u is) doubles:
    the kernels steer along the direction they are handed, not one they recompute."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(50, 16, generator=g).to(DEVICE)
    hidden = torch.randn(4, 16, generator=g).to(DEVICE)
    prepared = ak.prepare_anchors(weight, ak.AnchorBank([ak.AnchorSet([1, 2], [3]), ak.AnchorSet([4], [5, 6])]))
    config = ak.SteerConfig(steps=3, eta=0.2, objective="mean", margin=None)
    rows = [0, 1, -1, 1]
    once = ak.steer_hidden(hidden, weight, prepared, config, backend=backend, row_sets=rows)
    twice = ak.steer_hidden(hidden, weight, prepared._replace(direction=2 * prepared.direction), config,
                            backend=backend, row_sets=rows)
    torch.testing.assert_close(twice - hidden, 2 * (once - hidden), rtol=1e-5, atol=1e-6)
    assert torch.equal(once[2], hidden[2]) and (once - hidden).abs().sum() > 0


@pytest.mark.parametrize("backend", kernel_backends())
def test_mean_direction_of_the_wrong_shape_is_refused(backend):
    weight = torch.randn(20, 8, device=DEVICE)
    prepared = ak.prepare_anchors(weight, ak.AnchorSet([1, 2], [3]))
    op = (torch.ops.anchor_kernels.steer_hidden_triton if backend == "triton"
          else torch.ops.anchor_kernels.steer_hidden)
    hidden = torch.randn(3, 8, device=DEVICE)
    rows, eta = torch.zeros(3, dtype=torch.long, device=DEVICE), torch.full((3,), 0.1, device=DEVICE)
    for bad in (prepared.direction[:, :7], prepared.direction.double(), prepared.direction.T):
        with pytest.raises(RuntimeError, match="direction must be"):
            op(hidden, weight, None, *prepared.tensors, rows, eta, 2, "mean", 0.0, 1.0, math.inf, math.inf,
               False, bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backend_is_the_oracle_rounded(dtype):
    case = dict(seed=3, lead=(4,), d=16, vocab=30, sizes=[(2, 3)], custom_weights=False, bias=True,
                per_row_eta=False, layout="contiguous",
                config=ak.SteerConfig(steps=4, objective="lse", max_norm=0.5, margin=None))
    args = build_case(case, dtype, device=torch.device("cpu"))
    out = ak.steer_hidden(args["hidden"], args["weight"], args["anchors"], args["config"],
                          bias=args["bias"], backend="reference")
    assert torch.equal(out, reference_fp64(**args).to(dtype).reshape(out.shape))


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[t.dtype])


def _special_hidden(dtype, rows=4, d=9):
    hidden = torch.randn(rows, d)
    hidden[0, 0] = -0.0
    hidden[1, 2] = float("nan")
    hidden[2, 3] = float("inf")
    return hidden.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("how", ["steps=0", "strength=0", "eta=0", "row_sets=-1", "margin=-inf-like"])
def test_untouched_rows_are_bit_exact(backend, dtype, how):
    hidden = _special_hidden(dtype)
    weight = torch.randn(20, hidden.shape[1]).to(dtype).to(DEVICE)
    anchors = ak.AnchorSet([1, 2], [3])
    config = {"steps=0": ak.SteerConfig(steps=0, margin=None), "strength=0": ak.SteerConfig(strength=0.0, margin=None),
              "eta=0": ak.SteerConfig(eta=0.0, margin=None),
              "row_sets=-1": ak.SteerConfig(margin=None), "margin=-inf-like": ak.SteerConfig(margin=-1e30)}[how]
    row_sets = [-1] * hidden.shape[0] if how == "row_sets=-1" else None
    out = ak.steer_hidden(hidden, weight, anchors, config, backend=backend, row_sets=row_sets)
    assert torch.equal(_bits(out), _bits(hidden))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("objective", ["mean", "lse"])
def test_nonfinite_rows_pass_through_and_do_not_leak(backend, dtype, objective):
    hidden = _special_hidden(dtype)
    weight = (torch.randn(20, hidden.shape[1]) / 3).to(dtype).to(DEVICE)
    anchors = ak.AnchorSet([1, 2], [3, 4])
    config = ak.SteerConfig(steps=5, objective=objective, margin=None)
    out = ak.steer_hidden(hidden, weight, anchors, config, backend=backend)
    assert torch.equal(_bits(out[1:3]), _bits(hidden[1:3]))
    finite = hidden[[0, 3]]
    expected = reference_fp64(finite, weight, anchors, config)
    assert_steer_close(out[[0, 3]], finite, expected, dtype, backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_smallest_shapes(backend):
    """d = 1, K = 2, one row."""
    hidden = torch.tensor([[0.7]], device=DEVICE)
    weight = torch.tensor([[1.0], [-2.0], [0.5]], device=DEVICE)
    for objective in ("mean", "lse"):
        config = ak.SteerConfig(steps=3, objective=objective, margin=None)
        out = ak.steer_hidden(hidden, weight, ak.AnchorSet([0], [1]), config, backend=backend)
        expected = reference_fp64(hidden, weight, ak.AnchorSet([0], [1]), config)
        assert_steer_close(out, hidden, expected, torch.float32)
        assert out.item() > hidden.item()  # ascent on w0 - w1 = 3 > 0 moves h up


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_batch(backend):
    hidden = torch.empty(0, 5, device=DEVICE)
    out = ak.steer_hidden(hidden, torch.randn(7, 5, device=DEVICE), ak.AnchorSet([1], [2]), backend=backend)
    assert out.shape == (0, 5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_steering_raises_the_gap(backend):
    torch.manual_seed(0)
    weight = torch.randn(100, 32, device=DEVICE) / 4
    hidden = torch.randn(6, 32, device=DEVICE) * 2
    anchors = ak.AnchorSet([3, 5, 7], [11, 13])
    config = ak.SteerConfig(steps=10, eta=0.5, margin=None)
    out = ak.steer_hidden(hidden, weight, anchors, config, backend=backend)
    from anchor_kernels.reference import anchor_gap

    def gap(h):
        z = (h.double() @ weight.double().T)
        return anchor_gap(z[:, [3, 5, 7]], z[:, [11, 13]], anchors, config)

    assert bool((gap(out) > gap(hidden) + 0.1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("K", [129, 256])
def test_large_anchor_sets(backend, dtype, K):
    """Past 128 anchors Triton computes Gm c in chunks; every backend must still match."""
    g = torch.Generator().manual_seed(K)
    V, d, B = 400, 24, 19
    weight = (torch.randn(V, d, generator=g) / math.sqrt(d)).to(dtype).to(DEVICE)
    hidden = (torch.randn(B, d, generator=g) * 3).to(dtype).to(DEVICE)
    perm = torch.randperm(V, generator=g).tolist()
    bank = ak.AnchorBank([ak.AnchorSet(perm[: K // 2], perm[K // 2: K]), ak.AnchorSet(perm[K: K + 2], perm[K + 2: K + 9])])
    row_sets = torch.randint(-1, 2, (B,), generator=g).to(DEVICE)
    for objective, max_norm in (("lse", None), ("mean", 0.1)):
        config = ak.SteerConfig(steps=5, eta=0.4, objective=objective, reg=0.1, max_norm=max_norm, margin=None)
        out = ak.steer_hidden(hidden, weight, bank, config, backend=backend, row_sets=row_sets)
        assert_steer_close(out, hidden, reference_fp64(hidden, weight, bank, config, row_sets=row_sets), dtype, backend)


def test_triton_rejects_sets_past_its_limit():
    if unavailable_reason("triton", DEVICE) is not None:
        pytest.skip(unavailable_reason("triton", DEVICE))
    weight = torch.randn(300, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="at most 256 tokens"):
        ak.steer_hidden(torch.randn(2, 8, device=DEVICE), weight, ak.AnchorSet(list(range(150)), list(range(150, 257))),
                        backend="triton")
