"""Validation errors, the Gram cache, op registration (schema, fake, opcheck), torch.compile."""
import math
import re

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import native
from anchor_kernels.steer import resolve_backend, unavailable_reason
from conftest import DEVICE, kernel_backends

A = ak.AnchorSet([1, 2], [3])


def _args(**over):
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(10, 6), anchors=A,
                config=ak.SteerConfig(steps=2, margin=None), bias=None, row_sets=None, step_size=None)
    args.update(over)
    return args


def _call(backend="cpu", **over):
    a = _args(**over)
    return ak.steer_hidden(a["hidden"], a["weight"], a["anchors"], a["config"], bias=a["bias"],
                           backend=backend, row_sets=a["row_sets"], step_size=a["step_size"])


BANK = ak.AnchorBank([A, ak.AnchorSet([4], [5, 6])])

INVALID_CALLS = [
    ("id out of vocab", dict(anchors=ak.AnchorSet([1, 10], [3])), ValueError, r"outside \[0, 10\)"),
    ("wrong hidden rank", dict(hidden=torch.tensor(1.0)), ValueError, "hidden must be"),
    ("mismatched d", dict(hidden=torch.randn(4, 5)), ValueError, "hidden has d = 5"),
    ("weight rank", dict(weight=torch.randn(10, 6, 1)), ValueError, "weight must be 2-D"),
    ("integer hidden", dict(hidden=torch.ones(4, 6, dtype=torch.long)), TypeError, "hidden must be float32"),
    ("float64 hidden", dict(hidden=torch.randn(4, 6, dtype=torch.float64)), TypeError, "hidden must be float32"),
    ("mixed dtypes", dict(weight=torch.randn(10, 6).half()), TypeError, "weight is torch.float16"),
    ("bias dtype", dict(bias=torch.randn(10).half()), TypeError, "bias is torch.float16"),
    ("bias shape", dict(bias=torch.randn(9)), ValueError, r"bias must be a \[V\]"),
    ("device", dict(weight=torch.randn(10, 6, device="meta")), ValueError, "weight is on meta"),
    ("bank without row_sets", dict(anchors=BANK), ValueError, "row_sets is required"),
    ("row_sets too big", dict(anchors=BANK, row_sets=[0, 1, 2, -1]), ValueError, r"row_sets entries must be in \[-1, 2\)"),
    ("row_sets too small", dict(anchors=BANK, row_sets=[0, 1, -2, -1]), ValueError, r"row_sets entries"),
    ("row_sets float", dict(row_sets=[0.0, 0.0, 0.0, 0.0]), TypeError, "row_sets must hold integers"),
    ("row_sets shape", dict(row_sets=[0, 0]), ValueError, "row_sets must have one entry per row"),
    ("step_size negative", dict(step_size=[0.1, -0.1, 0.1, 0.1]), ValueError, "step_size entries"),
    ("step_size nan", dict(step_size=[0.1, math.nan, 0.1, 0.1]), ValueError, "step_size entries"),
    ("anchors type", dict(anchors=[1, 2]), TypeError, "anchors must be an AnchorSet"),
    ("config type", dict(config={"steps": 2}), TypeError, "config must be a SteerConfig"),
]


@pytest.mark.parametrize("over,exc,message", [c[1:] for c in INVALID_CALLS], ids=[c[0] for c in INVALID_CALLS])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_invalid_calls_name_the_argument(backend, over, exc, message):
    with pytest.raises(exc, match=message):
        _call(backend, **over)


INVALID_ANCHORS = [
    (dict(positive=[], negative=[1]), ValueError, "positive must hold at least one"),
    (dict(positive=[1], negative=[]), ValueError, "negative must hold at least one"),
    (dict(positive=[1, 2], negative=[2]), ValueError, r"token ids \[2\] are in both"),
    (dict(positive=[1, 1], negative=[2]), ValueError, "positive holds duplicate"),
    (dict(positive=[-1], negative=[2]), ValueError, "positive holds a negative token id"),
    (dict(positive=[1.5], negative=[2]), TypeError, "positive must hold integer"),
    (dict(positive="abc", negative=[2]), TypeError, "positive must be a sequence"),
    (dict(positive=[1], negative=torch.tensor([2.0])), TypeError, "negative must hold integer"),
    (dict(positive=[1, 2], negative=[3], positive_weights=[1.0]), ValueError, "positive_weights has 1"),
    (dict(positive=[1], negative=[3], negative_weights=[0.0]), ValueError, "negative_weights must all be finite and > 0"),
    (dict(positive=[1], negative=[3], negative_weights=[math.inf]), ValueError, "negative_weights"),
    (dict(positive=[1, 2], negative=[3], positive_weights="12"), TypeError, "positive_weights must be a sequence"),
    (dict(positive=[1, 2], negative=[3], positive_weights=[1, "2"]), TypeError, "positive_weights must hold real"),
    (dict(positive=[1, 2], negative=[3], positive_weights=[True, 1]), TypeError, "positive_weights must hold real"),
    (dict(positive=[1, 2], negative=[3], positive_weights=[1.0, 1e-40]), ValueError, "below 1e-30"),
]


@pytest.mark.parametrize("kwargs,exc,message", INVALID_ANCHORS)
def test_invalid_anchor_sets(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ak.AnchorSet(**kwargs)


def test_empty_bank_and_bad_member():
    with pytest.raises(ValueError, match="at least one AnchorSet"):
        ak.AnchorBank([])
    with pytest.raises(TypeError, match=r"sets\[1\] must be an AnchorSet"):
        ak.AnchorBank([A, "x"])


INVALID_CONFIGS = [
    (dict(steps=-1), ValueError, r"steps must be in \[0, 10000\]"),
    (dict(steps=2**62), ValueError, r"steps must be in \[0, 10000\]"),
    (dict(steps=1.5), TypeError, "steps must be an int"),
    (dict(strength=math.nan), ValueError, "strength must be finite"),
    (dict(strength=1e39), ValueError, "strength must be finite in float32"),
    (dict(strength=-0.1), ValueError, "strength must be >= 0"),
    (dict(strength=True), TypeError, "strength must be a real number"),
    (dict(eta=math.nan), ValueError, "eta must be finite"),
    (dict(eta=1e39), ValueError, "eta must be finite in float32"),
    (dict(eta=-0.1), ValueError, "eta must be >= 0"),
    (dict(eta="0.5"), TypeError, "eta must be a real number"),
    (dict(strength=0.1, eta=0.1), ValueError, "not both"),
    (dict(reg=math.inf), ValueError, "reg must be finite"),
    (dict(reg=1e39), ValueError, "reg must be finite in float32"),
    (dict(temperature=0.0), ValueError, "temperature must be >= 0.0001"),
    (dict(temperature=1e-38), ValueError, "temperature must be >= 0.0001"),
    (dict(temperature=1e-50), ValueError, "temperature must be >= 0.0001"),
    (dict(temperature=1e7), ValueError, "temperature must be <= 1e"),
    (dict(margin=math.nan), ValueError, "margin must be finite"),
    (dict(margin=-1e39), ValueError, "margin must be finite in float32"),
    (dict(relative_step=1), TypeError, "step_size was ambiguous and is removed"),
    (dict(step_size=0.1), TypeError, "step_size was ambiguous and is removed"),
    (dict(max_norm=-1.0), ValueError, "max_norm must be >= 0"),
    (dict(max_norm=math.inf), ValueError, "max_norm must be finite"),
    (dict(objective="max"), ValueError, "objective must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,message", INVALID_CONFIGS)
def test_invalid_configs(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ak.SteerConfig(**kwargs)


def _op_args(**over):
    prepared = ak.prepare_anchors(torch.randn(10, 6), A)
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(10, 6), bias=None,
                anchor_ids=prepared.anchor_ids, anchor_weights=prepared.anchor_weights,
                gram=prepared.gram, row_sets=torch.zeros(4, dtype=torch.long),
                step_size=torch.full((4,), 0.5), steps=3, objective="lse", reg=0.0,
                temperature=1.0, margin=math.inf, max_norm=math.inf, relative_step=False)
    args.update(over)
    return list(args.values())


INVALID_OP_CALLS = [
    (dict(hidden=torch.randn(4, 6, 1)), "hidden must be 2-D"),
    (dict(weight=torch.randn(10, 5)), "weight"),
    (dict(anchor_ids=torch.tensor([[1, 10, 3]])), r"anchor_ids must be in \[0, 10\)"),
    (dict(anchor_ids=torch.tensor([[1.0, 2.0, 3.0]])), "anchor_ids"),
    (dict(gram=torch.zeros(1, 2, 2)), "gram"),
    (dict(row_sets=torch.tensor([0, 0, 1, 0])), r"row_sets entries must be in \[-1, 1\)"),
    (dict(row_sets=torch.zeros(3, dtype=torch.long)), "row_sets"),
    (dict(step_size=torch.zeros(4, dtype=torch.float64)), "step_size"),
    (dict(steps=-1), r"steps must be in \[0, 10000\]"),
    (dict(steps=2**40), r"steps must be in \[0, 10000\]"),
    (dict(objective="max"), "objective must be 'mean' or 'lse'"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=1e-38), "temperature"),
    (dict(reg=1e39), "reg must be >= 0 and finite in float32"),
    (dict(margin=math.nan), "margin"),
    (dict(max_norm=-1.0), "max_norm"),
]


@pytest.mark.skipif(not native.available(), reason="anchor_kernels._C not built")
@pytest.mark.parametrize("over,message", INVALID_OP_CALLS)
def test_op_validates_its_arguments(over, message):
    """Direct torch.ops callers get the same care as the Python API."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.anchor_kernels.steer_hidden(*_op_args(**over))


def test_anchor_gram_values_and_shapes():
    torch.manual_seed(0)
    weight = torch.randn(30, 7)
    gram = ak.anchor_gram(weight, A)
    rows = weight[list(A.ids)].double()
    torch.testing.assert_close(gram, (rows @ rows.T).float())
    bank = ak.AnchorBank([A, ak.AnchorSet([4], [5, 6, 7, 8])])
    gram_bank = ak.anchor_gram(weight, bank)
    assert gram_bank.shape == (2, 5, 5) and gram_bank.dtype == torch.float32
    assert torch.equal(gram_bank[0, :3, :3], gram) and not gram_bank[0, 3:].any() and not gram_bank[0, :, 3:].any()


def test_prepared_anchors_are_checked_against_the_weight():
    """No hidden cache: AnchorSets are packed per call; a PreparedAnchors handle is a snapshot
    that refuses a weight it was not built for, or one modified in place since."""
    weight = torch.randn(30, 7)
    hidden = torch.randn(2, 7)
    prepared = ak.prepare_anchors(weight, A)
    assert ak.prepare_anchors(weight, prepared) is prepared
    ak.steer_hidden(hidden, weight, prepared)
    with torch.no_grad():
        weight.mul_(2)  # in-place update
    with pytest.raises(ValueError, match="modified in place since prepare_anchors"):
        ak.steer_hidden(hidden, weight, prepared)
    fresh = ak.prepare_anchors(weight, A)
    torch.testing.assert_close(fresh.gram, prepared.gram * 4)
    with pytest.raises(ValueError, match="prepared for another weight tensor"):
        ak.steer_hidden(hidden, weight.clone(), fresh)
    with pytest.raises(ValueError, match="V = 30 rows, but weight has V = 20"):
        ak.steer_hidden(hidden, weight[:20], fresh)
    meta = ak.prepare_anchors(torch.randn(30, 7, device="meta"), A)
    with pytest.raises(ValueError, match="prepared on meta"):
        ak.steer_hidden(hidden, weight, meta)


def test_prepared_anchors_round_trip():
    weight = torch.randn(30, 7)
    bank = ak.AnchorBank([A, ak.AnchorSet([4, 9], [5], positive_weights=[1, 3])])
    assert ak.prepare_anchors(weight, bank).to_bank() == bank


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_compact_bank_steers_with_the_anchor_rows_alone(backend):
    """What a tensor-parallel rank does: W[ids] and the renumbered bank give the full head's edit."""
    from anchor_kernels.anchors import compact_bank

    torch.manual_seed(1)
    weight = torch.randn(50, 9, device=DEVICE)
    bank = ak.AnchorBank([ak.AnchorSet([41, 3], [17], positive_weights=[2, 1]), ak.AnchorSet([17, 8], [44, 3])])
    ids, compact = compact_bank(bank)
    assert ids == [3, 8, 17, 41, 44] and compact.sets[0] == ak.AnchorSet([3, 0], [2], positive_weights=[2, 1])
    hidden = torch.randn(4, 9, device=DEVICE)
    rows = [0, 1, -1, 1]
    config = ak.SteerConfig(strength=0.05, margin=None)
    full = ak.steer_hidden(hidden, weight, bank, config, backend=backend, row_sets=rows)
    alone = ak.steer_hidden(hidden, weight[ids], compact, config, backend=backend, row_sets=rows)
    assert not torch.equal(full[0], hidden[0])
    torch.testing.assert_close(alone, full, rtol=0, atol=0)


@pytest.mark.skipif(not native.available(), reason="anchor_kernels._C not built")
def test_triton_op_has_the_same_schema():
    from anchor_kernels import triton_steer

    if triton_steer.IMPORT_ERROR is not None:
        pytest.skip(str(triton_steer.IMPORT_ERROR))
    triton_schema = str(torch.ops.anchor_kernels.steer_hidden_triton.default._schema)
    # Python's annotation `int` is inferred as SymInt: the same argument, possibly symbolic.
    assert triton_schema[triton_schema.index("("):].replace("SymInt", "int") == native.op_schema()


def _opcheck_args(device, objective="lse"):
    torch.manual_seed(0)
    weight = torch.randn(40, 24, device=device)
    bank = ak.AnchorBank([A, ak.AnchorSet([4, 5, 6], [7, 8])])
    prepared = ak.prepare_anchors(weight, bank)
    hidden = torch.randn(5, 24, device=device)
    return (hidden, weight, torch.randn(40, device=device), *prepared.tensors,
            torch.tensor([0, 1, -1, 1, 0], device=device), torch.full((5,), 0.3, device=device),
            4, objective, 0.1, 1.0, math.inf, 0.5, True) + ((prepared.direction,) if objective == "mean" else ())


@pytest.mark.parametrize("objective", ["lse", "mean"])  # mean: with the prepared direction
@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend, objective):
    op = (torch.ops.anchor_kernels.steer_hidden_triton if backend == "triton"
          else torch.ops.anchor_kernels.steer_hidden)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
    if backend == "triton" and DEVICE.type == "cpu":
        utils = ("test_schema",)  # interpreted kernels cannot run on fake tensors
    torch.library.opcheck(op.default, _opcheck_args(DEVICE, objective), test_utils=utils)


def test_auto_backend_and_override(monkeypatch):
    if native.available():
        assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("ANCHOR_KERNELS_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        resolve_backend("fast", torch.device("cpu"))
    assert "CUDA tensors" in unavailable_reason("cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match=re.escape("backend 'cuda' is unavailable")):
        _call("cuda")


@pytest.mark.skipif(DEVICE.type != "cpu" or not native.available(), reason="CPU compile check")
def test_compile_fullgraph_cpu():
    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    hidden = torch.randn(3, 16)
    prepared = ak.prepare_anchors(weight, A)
    config = ak.SteerConfig(steps=3, max_norm=0.5, margin=None)

    def step(h, anchors):
        return ak.steer_hidden(torch.tanh(h) * 4, weight, anchors, config, backend="cpu") @ weight.T

    for anchors in (prepared, A):  # prepared outside, or packed inside the graph
        compiled = torch.compile(step, fullgraph=True)
        torch.testing.assert_close(compiled(hidden, anchors), step(hidden, anchors))


def test_auto_falls_back_to_triton_without_a_cuda_kernel_image(monkeypatch):
    """A GPU the build has no kernel for (e.g. a new architecture without PTX): `cuda` says why
    and `auto` uses triton instead of raising."""
    from anchor_kernels import steer, triton_steer

    if triton_steer.IMPORT_ERROR is not None:
        pytest.skip(str(triton_steer.IMPORT_ERROR))
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(native, "cuda_built", lambda: True)
    monkeypatch.setattr(native, "cuda_device_problem", lambda index: "no kernel image for this GPU: sm_120")
    gpu = torch.device("cuda", 0)
    assert "no kernel image" in steer.unavailable_reason("cuda", gpu)
    assert steer.resolve_backend("auto", gpu) == "triton"
    with pytest.raises(RuntimeError, match="no kernel image"):
        steer.resolve_backend("cuda", gpu)


def test_triton_grid_is_flat_so_many_sets_launch():
    from anchor_kernels import triton_steer

    assert triton_steer.launch_grid(17, 70_000) == (2 * 70_000,)  # y/z axes would stop at 65,535
    assert triton_steer.launch_grid(1, 1) == (1,)


def test_launch_config_is_what_the_aot_check_compiles():
    from anchor_kernels import aot, triton_steer

    compiled = {(d, triton_steer.launch_config(K, dim, d == "fp32")["BLOCK_K"],
                 triton_steer.launch_config(K, dim, d == "fp32")["BLOCK_D"])
                for d, K, dim, _, _ in aot.configurations()}
    for dtype in ("fp32", "fp16", "bf16"):
        for K in (1, 2, 16, 17, 33, 64, 65, 128, 129, 200, 256):
            for dim in (1, 7, 16, 33, 64, 100, 576, 4096, 8192):
                cfg = triton_steer.launch_config(K, dim, dtype == "fp32")
                assert (dtype, cfg["BLOCK_K"], cfg["BLOCK_D"]) in compiled, (dtype, K, dim)


def test_the_aot_check_fails_on_spills_and_shared_memory_past_its_budgets():
    from anchor_kernels import aot

    base = dict(kernel="hidden", arch="sm_90a", dtype="bf16", BLOCK_K=64, BLOCK_D=64, LSE=True, TRUST=True,
                HAS_BIAS=True, RELATIVE=True, shared=20_480, local_bytes=0)
    assert aot.check([base]) == []
    assert len(aot.check([{**base, "local_bytes": 4}])) == 1  # any spill up to K = 128
    assert len(aot.check([{**base, "shared": aot.SHARED_LIMIT + 1}])) == 1
    fp32_128 = {**base, "dtype": "fp32", "BLOCK_K": 128, "local_bytes": 24}
    assert aot.check([fp32_128]) == []  # the one budgeted tile below K = 256 ...
    assert len(aot.check([{**fp32_128, "arch": "sm_80"}])) == 1  # ... on sm_90a only
    assert len(aot.check([{**fp32_128, "kernel": "_split_finish_kernel"}])) == 1  # ... and its own kernel
    assert len(aot.check([{**fp32_128, "local_bytes": aot.HIDDEN_FP32_K128_SM90_BUDGET + 1}])) == 1
    chunked = {**base, "BLOCK_K": 256, "local_bytes": aot.CHUNKED_LOCAL_BUDGET}
    assert aot.check([chunked]) == [] and len(aot.check([{**chunked, "local_bytes": aot.CHUNKED_LOCAL_BUDGET + 1}])) == 1


@pytest.mark.skipif(ak.steer.unavailable_reason("triton", torch.device("cpu")) is not None, reason="needs triton")
@pytest.mark.parametrize("job", [("hidden", "bf16", 16, "lse", "split_d", 8), ("hidden", "fp32", 64, "mean", "tiled", 1),
                                 ("logits", "bf16", 64, "lse", "tiled", 8)])
def test_the_aot_check_captures_what_the_launchers_launch(job, monkeypatch):
    """Issue 19 item 7: the launches are recorded from the launchers themselves (nothing runs), so
    the AOT check compiles them with the arguments (and Triton's specialisation of them) of a real call."""
    from anchor_kernels import aot, triton_steer

    monkeypatch.delenv(triton_steer.PLAN_ENV, raising=False)
    launches = aot.capture_launches(job)
    names = [kernel.fn.__name__ for kernel, _, _ in launches]
    expected = {("hidden", "split_d"): ["_split_partial_kernel", "_split_finish_kernel"],
                ("hidden", "tiled"): ["_mean_direction_kernel", "_steer_mean_kernel"],
                ("logits", "tiled"): ["_solve_logits_kernel", "_apply_logits_kernel"]}[(job[0], job[4])]
    assert names == expected
    for kernel, args, kwargs in launches:
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        assert bound.get("NATIVE_DOT16", True) is True  # compiled, not interpreted, dots
        if "num_sets" in bound:
            assert bound["num_sets"] == 1  # Triton makes it a constant when it launches
