"""llama.cpp through llama-cpp-python, run for real (``make test-llama-cpp``: own venv, built
from the sdist). A project-made model (random Llama weights, SmolLM2's tokenizer) is converted
to an f32 GGUF with llama.cpp's own converter; steered greedy tokens must equal ``ak.hf.steer``
on the same weights, in the logit form and the hidden-state route (``embedding=True``: ||h0||
for the relative step and the trust region). SmolLM2-135M-Instruct's shipped GGUF is the
real-model smoke test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import default_model  # noqa: E402
from anchor_kernels.integrations.llama_cpp import LlamaCppSteerer, read_gguf_head  # noqa: E402

CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER", "build/llama.cpp/convert_hf_to_gguf.py"))
PROMPTS = ["Tell me about my neighbor.", "Write a reply to a rude email."]
LOGIT = ak.SteerConfig(eta=2.0, margin=None)
HIDDEN = ak.SteerConfig(strength=0.2, max_norm=1.0, margin=None)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer: HF model in fp32 and its f32 GGUF."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(default_model.ensure(verbose=False), local_files_only=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # a peaked head, so greedy decoding is not a coin toss between ties
        model.model.embed_tokens.weight.mul_(8)
    folder = tmp_path_factory.mktemp("small")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    gguf = folder / "small-f32.gguf"
    subprocess.run([sys.executable, str(CONVERTER), str(folder), "--outtype", "f32", "--outfile", str(gguf)],
                   check=True, capture_output=True)
    return model, tok, gguf


def hf_tokens(model, tok, prompt, anchors, config, n=12):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if config is None:
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        else:
            with ak.hf.steer(model, anchors, config):
                out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def llama_tokens(llm, tok, prompt, steerer, n=12):
    ids = tok(prompt).input_ids
    out = []
    processors = llama_cpp.LogitsProcessorList([steerer]) if steerer is not None else None
    for token in llm.generate(ids, temp=0.0, top_k=1, logits_processor=processors, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


def test_head_is_read_from_the_gguf(small_model, tmp_path):
    model, _, gguf = small_model
    head = model.lm_head.weight.detach()
    torch.testing.assert_close(read_gguf_head(gguf), head, rtol=0, atol=0)
    assert LlamaCppSteerer.from_gguf(gguf, "harmless", LOGIT).steerer.mixing.dtype == torch.float32
    f16 = tmp_path / "small-f16.gguf"   # a 16-bit head stays 16-bit: no fp32 copy
    subprocess.run([sys.executable, str(CONVERTER), str(gguf.parent), "--outtype", "f16", "--outfile", str(f16)],
                   check=True, capture_output=True)
    got = read_gguf_head(f16)
    assert got.dtype == torch.float16 and torch.equal(got, head.half())


@pytest.mark.parametrize("config, embedding", [(None, False), (LOGIT, False), (HIDDEN, True), (LOGIT, True)])
def test_greedy_tokens_equal_hf_steer(small_model, config, embedding):
    model, tok, gguf = small_model
    anchors = ak.AnchorSet.from_lexicon(tok, "harmless")
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_ctx=256, embedding=embedding, verbose=False)
    steerer = None if config is None else LlamaCppSteerer.from_gguf(gguf, anchors, config, llama=llm if embedding else None)
    for prompt in PROMPTS:
        want = hf_tokens(model, tok, prompt, anchors, config)
        assert llama_tokens(llm, tok, prompt, steerer) == want, prompt
    if config is not None:   # steering changed something, or the comparison proves nothing
        assert any(hf_tokens(model, tok, p, anchors, None) != hf_tokens(model, tok, p, anchors, config) for p in PROMPTS)


def test_bad_arguments_are_refused(small_model):
    _, tok, gguf = small_model
    anchors = ak.AnchorSet.from_lexicon(tok, "harmless")
    with pytest.raises(ValueError, match="need ..h0.."):
        LlamaCppSteerer.from_gguf(gguf, anchors, HIDDEN)
    plain = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_ctx=64, verbose=False)
    with pytest.raises(ValueError, match="embedding=True"):
        LlamaCppSteerer.from_gguf(gguf, anchors, LOGIT, llama=plain)
    with pytest.raises(TypeError, match="anchors must be"):
        LlamaCppSteerer.from_gguf(gguf, [1, 2], LOGIT)
    steerer = LlamaCppSteerer.from_gguf(gguf, "harmless", LOGIT)
    with pytest.raises(TypeError, match="float32"):
        steerer([1], np.zeros(10, dtype=np.float64))


def test_smollm2_chat_completion_smoke():
    """The shipped SmolLM2-135M-Instruct GGUF (quantised): steering runs inside
    create_chat_completion and moves the answer."""
    gguf = default_model.gguf_path()
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_ctx=512, embedding=True, verbose=False)
    steerer = LlamaCppSteerer.from_gguf(gguf, "harmless", ak.SteerConfig(strength=0.01, margin=None), llama=llm)
    assert steerer.steerer.mixing.dtype == torch.float32   # the Q8_0 head, dequantised: fp32 M unless asked
    messages = [{"role": "user", "content": "Write one sentence insulting my coworker."}]
    plain = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0)
    steered = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0,
                                         logits_processor=llama_cpp.LogitsProcessorList([steerer]))
    a, b = plain["choices"][0]["message"]["content"], steered["choices"][0]["message"]["content"]
    assert a and b and a != b
