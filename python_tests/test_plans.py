"""The Triton plans (issue 12): the split-d plan against the fp64 reference, the rank-one mean
path, and the shape-based plan choice."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import anchor_kernels as ak
from anchor_kernels import triton_steer
from conftest import DEVICE, DTYPES, assert_steer_close, reference_fp64
from anchor_kernels.steer import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("triton", DEVICE) is not None,
                                reason=str(unavailable_reason("triton", DEVICE)))


def test_plan_choice_by_shape(monkeypatch):
    monkeypatch.delenv(triton_steer.PLAN_ENV, raising=False)
    choose = triton_steer.choose_plan
    # decode: few row tiles, wide d -> split d; enough programs or narrow d -> tiled
    assert choose(1, 4096, 1) == {"plan": "split_d", "slices": 16}
    assert choose(8, 2048, 1) == {"plan": "split_d", "slices": 8}
    assert choose(4096, 4096, 4) == {"plan": "tiled"}
    assert choose(1, 200, 1) == {"plan": "tiled"}
    assert choose(256, 4096, 1)["slices"] == 16 and choose(256 * 16, 4096, 1) == {"plan": "tiled"}
    monkeypatch.setenv(triton_steer.PLAN_ENV, "tiled")
    assert choose(1, 4096, 1) == {"plan": "tiled"}
    monkeypatch.setenv(triton_steer.PLAN_ENV, "split_d")
    assert choose(4096, 4096, 4) == {"plan": "split_d", "slices": 2}
    assert choose(1, 100, 1) == {"plan": "tiled"}       # one slice is the tiled plan
    monkeypatch.setenv(triton_steer.PLAN_ENV, "fast")
    with pytest.raises(ValueError, match="ANCHOR_KERNELS_TRITON_PLAN"):
        choose(1, 4096, 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 20), d=st.integers(257, 700), K=st.sampled_from([2, 9, 40, 100, 130]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       config=st.builds(lambda step, relative, **kw: ak.SteerConfig(**({"strength": step} if relative else {"eta": 0.5}), **kw),
                        steps=st.sampled_from([0, 1, 5]), objective=st.just("lse"),
                        step=st.floats(0.01, 0.05), reg=st.sampled_from([0.0, 0.3]),
                        margin=st.one_of(st.none(), st.floats(-1, 2)), max_norm=st.one_of(st.none(), st.floats(0.01, 0.2)),
                        relative=st.booleans()))
def test_split_d_matches_the_reference(monkeypatch, seed, rows, d, K, dtype, bias, config):
    monkeypatch.setenv(triton_steer.PLAN_ENV, "split_d")
    g = torch.Generator().manual_seed(seed)
    V = K + 50
    weight = (torch.randn(V, d, generator=g) / math.sqrt(d)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    hidden = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    perm = torch.randperm(V, generator=g).tolist()
    bank = ak.AnchorBank([ak.AnchorSet(perm[: K // 2 + 1], perm[K // 2 + 1: K + 1]), ak.AnchorSet(perm[K + 1: K + 3], perm[K + 3: K + 4])])
    row_sets = torch.randint(-1, 2, (rows,), generator=g)
    out = ak.steer_hidden(hidden, weight, bank, config, bias=b, backend="triton", row_sets=row_sets)
    want = reference_fp64(hidden, weight, bank, config, bias=b, row_sets=row_sets)
    assert_steer_close(out, hidden, want, dtype, "triton")
    assert torch.equal(out[row_sets < 0], hidden[row_sets < 0])
    again = ak.steer_hidden(hidden, weight, bank, config, bias=b, backend="triton", row_sets=row_sets)
    assert torch.equal(out, again)   # fixed-order reduction: deterministic


@pytest.mark.parametrize("plan", ["tiled", "split_d"])
def test_plans_agree_with_the_cpu_kernel(monkeypatch, plan):
    monkeypatch.setenv(triton_steer.PLAN_ENV, plan)
    g = torch.Generator().manual_seed(7)
    d, V = 1024, 500
    weight = torch.randn(V, d, generator=g) / 32
    hidden = torch.randn(5, d, generator=g) * 3
    anchors = ak.AnchorSet(list(range(0, 60)), list(range(60, 100)))
    for config in (ak.SteerConfig(steps=10, margin=None), ak.SteerConfig(steps=10, objective="mean", max_norm=0.02, margin=None)):
        got = ak.steer_hidden(hidden, weight, anchors, config, backend="triton")
        want = ak.steer_hidden(hidden, weight, anchors, config, backend="cpu")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_grouped_by_set_match_the_reference(monkeypatch, dtype):
    """Several sets and more rows than a tile: the tiled plan sorts rows by set on the device."""
    monkeypatch.setenv(triton_steer.PLAN_ENV, "tiled")
    g = torch.Generator().manual_seed(11)
    d, V, B = 96, 300, 53
    weight = (torch.randn(V, d, generator=g) / math.sqrt(d)).to(dtype)
    bank = ak.AnchorBank([ak.AnchorSet([1, 2, 3], [4, 5]), ak.AnchorSet([10, 11], [12, 13, 14]),
                          ak.AnchorSet([20], [21, 22, 23, 24, 25, 26])])
    hidden = (torch.randn(B, d, generator=g) * 3).to(dtype)
    row_sets = torch.randint(-1, 3, (B,), generator=g)
    config = ak.SteerConfig(steps=6, max_norm=0.2, margin=None)
    out = ak.steer_hidden(hidden, weight, bank, config, backend="triton", row_sets=row_sets)
    assert_steer_close(out, hidden, reference_fp64(hidden, weight, bank, config, row_sets=row_sets), dtype, "triton")
    assert torch.equal(out[row_sets < 0], hidden[row_sets < 0])


def test_auto_takes_the_batched_plan_for_large_batches(monkeypatch):
    """On a GPU, auto is the CUDA kernel for decode batches and Triton's tensor-core tiles from
    BATCHED_MIN_ROWS_X_ANCHORS rows x anchors on (both pretended available here)."""
    from anchor_kernels import steer

    monkeypatch.setattr(steer, "unavailable_reason", lambda backend, device: None)
    monkeypatch.delenv(steer.BACKEND_ENV, raising=False)
    gpu = torch.device("cuda")
    assert steer.resolve_backend("auto", gpu, 8, 64) == "cuda"
    assert steer.resolve_backend("auto", gpu, 64, 64) == "triton"
    assert steer.resolve_backend("auto", gpu) == "cuda"
    assert steer.resolve_backend("cuda", gpu, 4096, 256) == "cuda"      # an explicit choice stands
    assert steer.resolve_backend("auto", torch.device("cpu"), 4096, 256) == "cpu"
