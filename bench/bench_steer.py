"""pytest-benchmark suite: every backend present vs three baselines (baselines.py):
the literal method (full-vocabulary logits + autograd per step, model dtype), a competent eager
K-space version, and torch.compile of it.

    make bench                 # short grid (CPU friendly)
    AK_BENCH_FULL=1 make bench # the decode grid: B{1,8,64,256} d{2048,4096} V{32k,128k} K{16,64,256} T{1,10}
Use ratios only within one run. GPU floors per shape: bench/sweep.py.
"""
import itertools
import os

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.steer import unavailable_reason
from baselines import eager_kspace, literal_autograd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if os.environ.get("AK_BENCH_FULL") == "1":
    SHAPES = list(itertools.product((1, 8, 64, 256), (2048, 4096), (32000, 128000), (16, 64, 256), (1, 10)))
else:  # a decode step of a 1B-class model, and a single-request one
    SHAPES = [(8, 2048, 32000, 64, 10), (1, 2048, 32000, 16, 1)]
KERNELS = [b for b in ("cpu", "cuda", "triton") if unavailable_reason(b, DEVICE) is None]
# On a GPU each Triton plan also runs forced (issue 12): the automatic choice is "triton".
PLANS = [f"triton:{p}" for p in ("tiled", "split_d")] if "triton" in KERNELS and DEVICE.type == "cuda" else []
PROVIDERS = KERNELS + PLANS + ["eager_kspace", "compiled_kspace", "literal_autograd"]
_problems = {}


def problem(B, d, V, K, T):
    key = (d, V, K)
    if key not in _problems:
        _problems.clear()  # one LM head at a time: 128k x 4096 weights are large
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(V, d, generator=g) / d**0.5).to(DTYPE).to(DEVICE)
        perm = torch.randperm(V, generator=g).tolist()
        anchors = ak.AnchorSet(positive=perm[: K // 2], negative=perm[K // 2: K])
        _problems[key] = (weight, anchors, ak.prepare_anchors(weight, anchors))
    weight, anchors, prepared = _problems[key]
    hidden = (torch.randn(B, d, generator=torch.Generator().manual_seed(1)) * 4).to(DTYPE).to(DEVICE)
    return hidden, weight, anchors, prepared, ak.SteerConfig(steps=T, eta=0.5)


def _call(provider, hidden, weight, anchors, prepared, config):
    if provider in PLANS:
        plan = provider.split(":")[1]

        def forced():
            os.environ["ANCHOR_KERNELS_TRITON_PLAN"] = plan
            try:
                return ak.steer_hidden(hidden, weight, prepared, config, backend="triton")
            finally:
                os.environ.pop("ANCHOR_KERNELS_TRITON_PLAN")
        return forced
    if provider in KERNELS:
        return lambda: ak.steer_hidden(hidden, weight, prepared, config, backend=provider)
    if provider == "eager_kspace":
        return lambda: eager_kspace(hidden, weight, prepared, config)
    if provider == "compiled_kspace":
        compiled = torch.compile(eager_kspace)
        return lambda: compiled(hidden, weight, prepared, config)
    return lambda: literal_autograd(hidden, weight, anchors, config)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,d,V,K,T", SHAPES, ids=lambda v: str(v))
def test_steer(benchmark, provider, B, d, V, K, T):
    hidden, weight, anchors, prepared, config = problem(B, d, V, K, T)
    benchmark.group = f"B={B} d={d} V={V} K={K} T={T} {DTYPE}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                torch=torch.__version__, provider=provider)
    fn = _call(provider, hidden, weight, anchors, prepared, config)
    out = fn()  # warm-up (and compile)

    def run():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    slow = provider == "literal_autograd" and DEVICE.type == "cpu"
    if slow:
        benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        benchmark(run)
    if provider != "literal_autograd":  # the literal method has no Gram/trust-region shortcut to compare
        torch.testing.assert_close(out.float(), eager_kspace(hidden, weight, prepared, config).float(),
                                   rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("direction", ["prepared", "per_call"])
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("B,d,V,K,T", SHAPES, ids=lambda v: str(v))
def test_mean_direction(benchmark, backend, direction, B, d, V, K, T):
    """objective="mean" (rank one) with u = W_A^T w from prepare_anchors (what steer_hidden passes)
    against the kernels computing it on every call (a direct op call without ``direction``)."""
    hidden, weight, anchors, prepared, _ = problem(B, d, V, K, T)
    config = ak.SteerConfig(steps=T, eta=0.5, objective="mean")
    handle = prepared if direction == "prepared" else prepared._replace(direction=None)
    benchmark.group = f"mean B={B} d={d} K={K} T={T} {DTYPE} {backend}"
    out = ak.steer_hidden(hidden, weight, handle, config, backend=backend)

    def run():
        result = ak.steer_hidden(hidden, weight, handle, config, backend=backend)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark(run)
    torch.testing.assert_close(out.float(), eager_kspace(hidden, weight, prepared, config).float(),
                               rtol=2e-2, atol=2e-2)
