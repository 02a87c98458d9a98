"""GPU-only checks: CUDA-graph capture/replay, torch.compile(fullgraph=True), cuda vs triton,
and generation on the GPU backends in bf16. Skipped (with the reason) where no GPU exists."""
import math

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.steer import unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(
    torch.cuda.is_available() and unavailable_reason(b, CUDA) is not None,
    reason=str(torch.cuda.is_available() and unavailable_reason(b, CUDA)))) for b in ("cuda", "triton")]


def _problem(dtype=torch.bfloat16, B=37, d=1000, V=5000):
    torch.manual_seed(0)
    weight = (torch.randn(V, d, device=CUDA) / math.sqrt(d)).to(dtype)
    bank = ak.AnchorBank([ak.AnchorSet(list(range(10, 30)), list(range(30, 50))),
                          ak.AnchorSet([60, 61, 62], [70, 71])])
    prepared = ak.prepare_anchors(weight, bank)
    hidden = (torch.randn(B, d, device=CUDA) * 3).to(dtype)
    row_sets = torch.randint(-1, 2, (B,), device=CUDA)
    step_size = torch.rand(B, device=CUDA)
    config = ak.SteerConfig(steps=10, objective="lse", max_norm=0.3, margin=None)
    return hidden, weight, prepared, row_sets, step_size, config


# Every plan of both GPU backends (issue 12), forced through its environment variable.
PLANS = [("cuda", "ANCHOR_KERNELS_CUDA_PLAN", p) for p in ("tiled", "split_d")] + \
        [("triton", "ANCHOR_KERNELS_TRITON_PLAN", p) for p in ("tiled", "split_d")]


@pytest.mark.parametrize("objective", ["lse", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend, env, plan", PLANS)
def test_every_plan_matches_the_reference(monkeypatch, backend, env, plan, dtype, objective):
    if unavailable_reason(backend, CUDA) is not None:
        pytest.skip(unavailable_reason(backend, CUDA))
    from conftest import assert_steer_close, reference_fp64

    monkeypatch.setenv(env, plan)
    for B, d in ((1, 4096), (3, 1000), (300, 2048)):
        hidden, weight, prepared, row_sets, step_size, _ = _problem(dtype, B=B, d=d)
        config = ak.SteerConfig(steps=10, objective=objective, max_norm=0.3, margin=None)
        out = ak.steer_hidden(hidden, weight, prepared, config, backend=backend, row_sets=row_sets, step_size=step_size)
        want = reference_fp64(hidden.cpu(), weight.cpu(), prepared.to_bank(), config, row_sets=row_sets.cpu(),
                              step_size=step_size.cpu())
        assert_steer_close(out.cpu(), hidden.cpu(), want, dtype, backend)
        again = ak.steer_hidden(hidden, weight, prepared, config, backend=backend, row_sets=row_sets, step_size=step_size)
        assert torch.equal(out, again)


@pytest.mark.parametrize("plan", ["tiled", "split_d"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(monkeypatch, backend, plan):
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_PLAN", plan)
    monkeypatch.setenv("ANCHOR_KERNELS_TRITON_PLAN", plan)
    hidden, weight, prepared, row_sets, step_size, config = _problem()
    static = hidden.clone()

    def step():
        return ak.steer_hidden(static, weight, prepared, config, backend=backend, row_sets=row_sets,
                               step_size=step_size)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(3):
        torch.manual_seed(seed)
        static.copy_(torch.randn_like(static, dtype=torch.float32).to(static.dtype) * 3)
        graph.replay()
        assert torch.equal(captured, step())


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend, mode):
    hidden, weight, prepared, row_sets, step_size, config = _problem()

    def decode_step(h):
        steered = ak.steer_hidden(torch.nn.functional.silu(h), weight, prepared, config, backend=backend,
                                  row_sets=row_sets, step_size=step_size)
        return steered.float() @ weight.float().T

    compiled = torch.compile(decode_step, fullgraph=True, mode=mode)
    for _ in range(3):
        torch.testing.assert_close(compiled(hidden), decode_step(hidden), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_and_triton_agree(dtype):
    for backend in ("cuda", "triton"):
        if unavailable_reason(backend, CUDA):
            pytest.skip(unavailable_reason(backend, CUDA))
    hidden, weight, prepared, row_sets, step_size, config = _problem(dtype)
    outs = [ak.steer_hidden(hidden, weight, prepared, config, backend=b, row_sets=row_sets,
                            step_size=step_size).double() for b in ("cuda", "triton")]
    delta = (outs[0] - outs[1]).norm(dim=-1)
    moved = (outs[0] - hidden.double()).norm(dim=-1)
    assert bool((delta <= 2e-2 * moved + 2**-7 * outs[0].norm(dim=-1)).all())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hf_generation_on_gpu_bf16(backend):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                      pad_token_id=0, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).to(CUDA).eval()
    ids = torch.randint(3, 96, (4, 6), device=CUDA)
    anchors = ak.AnchorSet([5, 9, 17], [23, 42])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with ak.hf.steer(model, anchors, ak.SteerConfig(steps=10, eta=1.0, margin=None), backend=backend):
            steered = model.generate(ids, **kw)
    assert steered.shape == plain.shape and not torch.equal(steered, plain)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_form_on_gpu_matches_the_cpu_op(backend, dtype):
    """The fused logit op's GPU implementations (CUDA kernel, Triton) against the CPU op."""
    if unavailable_reason(backend, CUDA) is not None:
        pytest.skip(unavailable_reason(backend, CUDA))
    hidden, weight, prepared, row_sets, step_size, config = _problem(torch.float32, B=37, d=512, V=50000)
    bank = prepared.to_bank()
    raw = (hidden @ weight.T).to(dtype)
    norm = hidden.norm(dim=-1)
    want = ak.LogitSteerer(weight.cpu(), bank, config, backend="cpu", with_hidden_norm=True)(
        raw.cpu(), row_sets=row_sets.cpu(), step_size=step_size.cpu(), hidden_norm=norm.cpu())
    steerer = ak.LogitSteerer(weight, bank, config, backend=backend, with_hidden_norm=True)
    got = raw.clone()
    steerer.apply_(got, row_sets=row_sets, step_size=step_size, hidden_norm=norm)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[row_sets < 0], raw[row_sets < 0])
