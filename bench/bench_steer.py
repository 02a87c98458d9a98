"""Microbenchmarks of steer_hidden: our kernels vs the fp64 reference (the literal method:
full-vocabulary logits + autograd each step) vs a competent eager PyTorch K-space version.

    make bench                       # or: python -m pytest bench/ --benchmark-only
Ratios are only meaningful between rows of one run (same machine, same load).
"""
import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.steer import unavailable_reason
from baselines import eager_kspace

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# A decode step of a 1B-class model: batch 8, d 2048, 32k vocabulary, 64 anchors, 10 steps.
B, D, V, K, T = 8, 2048, 32000, 64, 10


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(DTYPE).to(DEVICE)
    hidden = (torch.randn(B, D, generator=g) * 4).to(DTYPE).to(DEVICE)
    perm = torch.randperm(V, generator=g).tolist()
    anchors = ak.AnchorSet(positive=perm[: K // 2], negative=perm[K // 2: K])
    config = ak.SteerConfig(steps=T, step_size=0.5, objective="lse")
    prepared = ak.prepare_anchors(weight, anchors)
    return hidden, weight, anchors, config, prepared


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, rounds=None):
    def call():
        out = fn()
        _sync()
        return out

    if rounds is None:
        return benchmark(call)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


KERNELS = [b for b in ("cpu", "cuda", "triton") if unavailable_reason(b, DEVICE) is None]


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel(benchmark, problem, backend):
    hidden, weight, anchors, config, prepared = problem
    benchmark.group = f"steer_hidden B={B} d={D} V={V} K={K} T={T} {DTYPE}"
    out = _run(benchmark, lambda: ak.steer_hidden(hidden, weight, prepared, config, backend=backend))
    torch.testing.assert_close(out.float(), eager_kspace(hidden, weight, prepared, config).float(),
                               rtol=2e-2, atol=2e-2)


def test_eager_kspace(benchmark, problem):
    hidden, weight, anchors, config, prepared = problem
    benchmark.group = f"steer_hidden B={B} d={D} V={V} K={K} T={T} {DTYPE}"
    _run(benchmark, lambda: eager_kspace(hidden, weight, prepared, config))


def test_reference_fp64(benchmark, problem):
    hidden, weight, anchors, config, prepared = problem
    benchmark.group = f"steer_hidden B={B} d={D} V={V} K={K} T={T} {DTYPE}"
    _run(benchmark, lambda: ak.steer_hidden(hidden, weight, anchors, config, backend="reference"),
         rounds=3)
