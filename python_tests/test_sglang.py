"""SGLang's CustomLogitProcessor, with hand-built inputs (SGLang itself needs CUDA): the rows
SGLang hands over, their custom_params (with the ``__req__`` entry SGLang adds), against the
fp64 reference."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

import anchor_kernels as ak
from anchor_kernels import reference
from anchor_kernels.integrations import serving
from anchor_kernels.integrations.sglang import AnchorSteeringSGLang

V, D = 300, 24
SETS = {"a": {"positive_ids": [3, 7, 11], "negative_ids": [20, 21]},
        "b": {"positive_ids": [50, 51], "negative_ids": [60, 61, 62, 63]}}


@pytest.fixture
def server(tmp_path, monkeypatch):
    torch.manual_seed(0)
    head = torch.randn(V, D) / D ** 0.5
    (tmp_path / "ckpt").mkdir()
    save_file({"lm_head.weight": head}, tmp_path / "ckpt" / "model.safetensors")
    cfg = {"model": str(tmp_path / "ckpt"), "config": {"steps": 8, "eta": 0.7}, "sets": SETS}
    (tmp_path / "s.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(serving.CONFIG_ENV, str(tmp_path / "s.json"))
    return head, serving.ServingConfig.from_dict(cfg)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([None, "a", "b"]), min_size=1, max_size=6),
       st.lists(st.one_of(st.none(), st.floats(0.0, 2.0)), min_size=6, max_size=6), st.integers(0, 2**31))
def test_rows_match_the_fp64_reference(server, names, steps, seed):
    head, cfg = server
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(names), D, generator=g) * 3
    params = []
    for name, step in zip(names, steps):
        p = {"__req__": object(), "unrelated": 1}
        if name is not None:
            p["anchor_set"] = name
            if step is not None:
                p["anchor_step_size"] = step
        params.append(p)
    logits = hidden @ head.T
    got = AnchorSteeringSGLang()(logits.clone(), params)
    rows = torch.tensor([-1 if n is None else cfg.names.index(n) for n in names])
    eta = torch.tensor([cfg.config.step_size if s is None else s for s in steps[: len(names)]])
    bank = cfg.bank(None)
    want = reference.steer_rows_fp64(hidden.double(), head.double(), None, bank, rows, eta, cfg.config) @ head.double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[rows < 0], logits[rows < 0])


def test_arguments_are_checked_on_the_client_and_the_server(server):
    assert AnchorSteeringSGLang.params("b", step_size=0.1) == {"anchor_set": "b", "anchor_step_size": 0.1}
    with pytest.raises(ValueError, match="not a configured anchor set"):
        AnchorSteeringSGLang.params("c")
    with pytest.raises(ValueError, match="anchor_step_size"):
        AnchorSteeringSGLang.params("a", step_size=-1)
    logits = torch.randn(2, V)
    with pytest.raises(ValueError, match="anchor_step_size"):
        AnchorSteeringSGLang()(logits, [{"anchor_set": "a", "anchor_step_size": "x"}, {}])
    with pytest.raises(ValueError, match="2 logits rows"):
        AnchorSteeringSGLang()(logits, [{}])
    assert AnchorSteeringSGLang()(logits, None) is logits
    assert torch.equal(AnchorSteeringSGLang()(logits.clone(), [{}, {"__req__": 1}]), logits)


def test_config_without_model_is_refused(tmp_path, monkeypatch):
    (tmp_path / "s.json").write_text(json.dumps({"sets": SETS}))
    monkeypatch.setenv(serving.CONFIG_ENV, str(tmp_path / "s.json"))
    with pytest.raises(ValueError, match="needs \"model\""):
        AnchorSteeringSGLang()(torch.randn(1, V), [{"anchor_set": "a"}])
