"""Issue 19, Python side: the GPU backends' known-answer self-test, auto's choice by what Triton
holds, and the Triton launch device guard."""
import contextlib
import warnings

import pytest
import torch

from anchor_kernels import selftest, steer, triton_steer
from anchor_kernels.steer import unavailable_reason

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(unavailable_reason("triton", CPU) is not None,
                                  reason=str(unavailable_reason("triton", CPU)))


@pytest.fixture(autouse=True)
def fresh_results(monkeypatch):
    monkeypatch.delenv(selftest.SELF_TEST_ENV, raising=False)
    monkeypatch.delenv(steer.BACKEND_ENV, raising=False)
    selftest.forget()
    yield
    selftest.forget()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_correct_backend_passes_its_self_test(dtype):
    """The real Triton kernels (interpreted) against the C++ CPU op: no failure, recorded once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selftest.failure("triton", CPU, dtype) is None
    assert selftest._results[("triton", str(CPU), dtype, "hidden")] is None


def _wrong_triton(monkeypatch):
    """A Triton op that answers wrongly (an edit half as long again)."""
    real = triton_steer.steer_hidden_triton
    calls = []

    def wrong(hidden, *args):
        calls.append(1)
        out = real(hidden, *args)
        return hidden + 1.5 * (out - hidden)

    monkeypatch.setattr(triton_steer, "steer_hidden_triton", wrong)
    return calls


@needs_triton
def test_a_wrong_backend_is_marked_broken_warned_once_skipped_by_auto_and_refused_by_name(monkeypatch):
    _wrong_triton(monkeypatch)
    monkeypatch.setitem(steer.AUTO_ORDER, "cpu", ("triton", "cpu"))
    with pytest.warns(RuntimeWarning, match="'triton' failed its known-answer self-test.*times the tolerance"):
        assert steer.resolve_backend("auto", CPU, 4, 8, torch.float32) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the result is remembered
        assert steer.resolve_backend("auto", CPU, 4, 8, torch.float32) == "cpu"
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: it failed its known-answer self-test"):
            steer.resolve_backend("triton", CPU, 4, 8, torch.float32)
    # per dtype: bf16 is tested on its own (and fails on its own)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        assert steer.resolve_backend("auto", CPU, 4, 8, torch.bfloat16) == "cpu"


@needs_triton
def test_nan_rows_fail_the_test(monkeypatch):
    """NaN is not "within tolerance" (max(0.0, nan) is 0.0: the comparison must not skip it)."""
    real = triton_steer.steer_hidden_triton

    def nan_rows(hidden, *args):
        out = real(hidden, *args)
        return torch.where(out != hidden, float("nan"), out)

    monkeypatch.setattr(triton_steer, "steer_hidden_triton", nan_rows)
    with pytest.warns(RuntimeWarning, match="times the tolerance"):
        assert selftest.failure("triton", CPU, torch.float32) is not None


@needs_triton
def test_the_logit_form_is_tested_when_a_steerer_is_built(monkeypatch):
    import anchor_kernels as ak

    weight = torch.randn(64, 32)
    anchors = ak.AnchorSet([1, 2], [3, 4])
    config = ak.SteerConfig(eta=0.1, margin=None)
    assert ak.LogitSteerer(weight, anchors, config, backend="triton").backend == "triton"
    assert selftest._results[("triton", str(CPU), torch.float32, "logits")] is None
    selftest.forget()
    real = triton_steer.steer_logits_triton_

    def wrong(logits, *args):
        real(logits, *args)
        logits.mul_(1.01)

    monkeypatch.setattr(triton_steer, "steer_logits_triton_", wrong)
    with pytest.warns(RuntimeWarning, match="logits form"):
        with pytest.raises(RuntimeError, match="failed its known-answer self-test"):
            ak.LogitSteerer(weight, anchors, config, backend="triton")


@needs_triton
def test_check_runs_every_test_for_a_device():
    results = selftest.check(CPU, dtypes=(torch.float32,))
    assert results == {("triton", torch.float32, "hidden"): None, ("triton", torch.float32, "logits"): None}


@needs_triton
def test_a_launch_that_raises_is_a_failed_test(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(triton_steer, "steer_hidden_triton", broken)
    with pytest.warns(RuntimeWarning, match="RuntimeError: no kernel image"):
        assert "no kernel image" in selftest.failure("triton", CPU, torch.float16)


@needs_triton
def test_the_environment_variable_turns_the_test_off(monkeypatch):
    calls = _wrong_triton(monkeypatch)
    monkeypatch.setenv(selftest.SELF_TEST_ENV, "0")
    assert steer.resolve_backend("triton", CPU, 4, 8, torch.float32) == "triton"
    assert not calls and not selftest._results


@needs_triton
def test_no_test_while_tracing_and_the_next_eager_call_runs_it(monkeypatch):
    calls = _wrong_triton(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert selftest.failure("triton", CPU, torch.float32) is None
    assert not calls and not selftest._results
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.warns(RuntimeWarning):
        assert selftest.failure("triton", CPU, torch.float32) is not None


def test_the_cpu_backend_and_the_reference_are_not_self_tested(monkeypatch):
    monkeypatch.setattr(selftest, "_run", lambda *a: pytest.fail("ran a self-test"))
    assert selftest.failure("cpu", CPU, torch.float32) is None
    assert selftest.failure("reference", CPU, torch.float32) is None


def test_auto_sends_sets_larger_than_triton_holds_to_the_cuda_kernel(monkeypatch):
    """Issue 19 item 5: K > triton_steer.MAX_SET_SIZE stays on CUDA however large the batch."""
    monkeypatch.setattr(steer, "unavailable_reason", lambda backend, device: None)
    gpu = torch.device("cuda")
    big = triton_steer.MAX_SET_SIZE + 1
    assert steer.resolve_backend("auto", gpu, 4096, big) == "cuda"
    assert steer.resolve_backend("auto", gpu, 4096, triton_steer.MAX_SET_SIZE) == "triton"


def test_triton_launches_make_the_tensors_device_current():
    """Issue 19 item 6: Triton launches on the current CUDA device; the launchers guard it."""
    guard = triton_steer.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_steer.device_guard(CPU), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_on_the_second_gpu_while_the_first_is_current():
    import anchor_kernels as ak

    dev = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=gen)
    hidden = torch.randn(5, 96, generator=gen)
    anchors = ak.AnchorSet([1, 2, 3], [4, 5])
    config = ak.SteerConfig(eta=0.1, margin=None)
    want = ak.steer_hidden(hidden, weight, anchors, config, backend="cpu")
    with torch.cuda.device(0):
        got = ak.steer_hidden(hidden.to(dev), weight.to(dev), anchors, config, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
