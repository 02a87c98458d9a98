"""pytest-benchmark: the fused logit-space op (LogitSteerer on CPU: anchor_kernels::steer_logits_)
against the eager logit form it replaces (gather, eager K-space loop, dense M c over all rows),
side by side in one run. Shapes: SmolLM2-135M's head (V=49152, d=576, the positive_sentiment
lexicon's K=111), and a 128k-vocabulary one.

    python -m pytest bench/bench_logits.py --benchmark-only
"""
import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import native

SHAPES = [(1, 49152, 576, 111, 10), (8, 49152, 576, 111, 10), (1, 128256, 256, 64, 10)]
PROVIDERS = ["fused", "eager"]
_steerers = {}


def steerer(V, d, K):
    key = (V, d, K)
    if key not in _steerers:
        _steerers.clear()
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(V, d, generator=g) / d**0.5
        perm = torch.randperm(V, generator=g).tolist()
        anchors = ak.AnchorSet(perm[: K // 2], perm[K // 2: K])
        _steerers[key] = (weight, ak.LogitSteerer(weight, anchors, ak.SteerConfig(eta=0.5)))
    return _steerers[key]


@pytest.mark.skipif(not native.available(), reason="anchor_kernels._C not built")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,V,d,K,T", SHAPES, ids=str)
def test_logit_form(benchmark, provider, B, V, d, K, T):
    weight, st = steerer(V, d, K)
    logits = torch.randn(B, d, generator=torch.Generator().manual_seed(1)) * 4 @ weight.T
    benchmark.group = f"logit form B={B} V={V} K={K} T={T} fp32"
    benchmark.extra_info.update(suite="logits", provider=provider, device="cpu", torch=torch.__version__)
    if provider == "fused":
        fn = lambda: st(logits)  # noqa: E731
    else:
        def fn():
            available = native.available
            native.available = lambda: False  # the eager path LogitSteerer took before the op
            try:
                return st(logits)
            finally:
                native.available = available
    out = fn()
    benchmark(fn)
    if provider == "fused":
        torch.testing.assert_close(out, _eager_reference(st, logits), rtol=1e-4, atol=1e-4)


def _eager_reference(st, logits):
    available = native.available
    native.available = lambda: False
    try:
        return st(logits)
    finally:
        native.available = available
