"""HF transformers integration on tiny randomly initialised models (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import reference  # noqa: E402
from conftest import DEVICE  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=None)


def make_model(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    t = transformers
    if arch == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**COMMON))
    elif arch == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON))
    elif arch == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**COMMON))
    elif arch == "gemma":
        model = t.GemmaForCausalLM(t.GemmaConfig(**{**COMMON, "num_key_value_heads": 1, "head_dim": 8}))
    elif arch == "gpt2":  # tied embeddings
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               initializer_range=0.3, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=None))
    elif arch == "llama-bias":  # an LM head with a bias
        model = make_model("llama")
        head = torch.nn.Linear(32, V, bias=True)
        torch.nn.init.normal_(head.weight, std=0.3)
        torch.nn.init.normal_(head.bias, std=0.5)
        model.lm_head = head
    else:
        raise ValueError(arch)
    return model.to(dtype).to(DEVICE).eval()


ARCHS = ["llama", "qwen2", "gpt2", "gemma", "mistral", "llama-bias"]
ANCHORS = ak.AnchorSet(positive=[5, 9, 17], negative=[23, 42])
CONFIG = ak.SteerConfig(steps=8, eta=1.0, objective="lse", margin=None)  # literal: the logit form needs ||h0|| for strength=


def _prompt(batch=2, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, length), generator=g).to(DEVICE)


def _generate(model, ids, **kw):
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)


def _head_input(model, ids):
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("arch", ARCHS)
def test_edits_exactly_the_lm_head_input(arch):
    model = make_model(arch)
    ids = _prompt()
    head_in, out = _head_input(model, ids)
    torch.testing.assert_close(head_in[:, -1], out.hidden_states[-1][:, -1])  # what we edit
    head = model.get_output_embeddings()
    with ak.hf.steer(model, ANCHORS, CONFIG, backend="cpu"):
        steered_in, steered = _head_input(model, ids)
    rows = head_in.reshape(-1, head_in.shape[-1])  # every position the head is given is steered
    expected = reference.steer_rows_fp64(rows, head.weight, head.bias, ak.AnchorBank([ANCHORS]),
                                         torch.zeros(rows.shape[0], dtype=torch.long),
                                         torch.full((rows.shape[0],), 1.0), CONFIG)
    torch.testing.assert_close(steered_in.reshape(rows.shape).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steered.logits, head(steered_in))


def _hand_loop(model, ids, steps, anchors=ANCHORS, config=CONFIG):
    """Greedy decoding that applies the fp64 reference to the LM-head input at every step."""
    head = model.get_output_embeddings()
    for _ in range(steps):
        h = model(ids, output_hidden_states=True).hidden_states[-1][:, -1]
        rows = ids.shape[0]
        h2 = reference.steer_rows_fp64(h, head.weight, head.bias, ak.AnchorBank([anchors]),
                                       torch.zeros(rows, dtype=torch.long), torch.full((rows,), config.step_size),
                                       config).to(h.dtype)
        ids = torch.cat([ids, head(h2).argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_hand_written_reference_loop(arch):
    model = make_model(arch)
    ids = _prompt()
    with torch.no_grad():
        expected = _hand_loop(model, ids, 6)
        with ak.hf.steer(model, ANCHORS, CONFIG, backend="cpu"):
            got = _generate(model, ids)
        plain = _generate(model, ids)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the steering did something


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-bias"])
def test_logits_processor_matches_hidden_state_path(arch):
    model = make_model(arch)
    ids = _prompt()
    head = model.get_output_embeddings()
    steerer = ak.hf.logit_steerer(model, ANCHORS, CONFIG)
    with torch.no_grad():
        raw = model(ids).logits[:, -1]
        with ak.hf.steer(model, ANCHORS, CONFIG, backend="cpu"):
            steered_hidden = model(ids).logits[:, -1]
            via_hidden = _generate(model, ids)
        torch.testing.assert_close(steerer(raw), steered_hidden, rtol=1e-4, atol=1e-4)
        processor = ak.hf.AnchorLogitsProcessor(steerer)
        via_logits = _generate(model, ids, logits_processor=transformers.LogitsProcessorList([processor]))
    assert torch.equal(via_logits, via_hidden)
    assert head.weight.shape[0] == steerer.vocab


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_processor_under_beam_search_ranks_beams_like_the_hook(arch):
    """Beam search passes log-softmaxed scores to processors and sums them over steps: the
    processor returns them re-normalised, so its beams are the hook form's."""
    model = make_model(arch)
    ids = _prompt()
    config = ak.SteerConfig(steps=8, eta=3.0, objective="lse", margin=None)
    steerer = ak.hf.logit_steerer(model, ANCHORS, config)
    kw = dict(num_beams=4, num_return_sequences=4, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with ak.hf.steer(model, ANCHORS, config, backend="cpu"):
            via_hidden = _generate(model, ids, **kw)
        processor = ak.hf.AnchorLogitsProcessor(steerer)
        via_logits = _generate(model, ids, logits_processor=transformers.LogitsProcessorList([processor]), **kw)
        log_probs = torch.randn(3, V).log_softmax(-1)
        torch.testing.assert_close(torch.logsumexp(processor(None, log_probs), -1), torch.zeros(3))
    assert torch.equal(via_logits.sequences, via_hidden.sequences)
    torch.testing.assert_close(via_logits.sequences_scores, via_hidden.sequences_scores, rtol=1e-4, atol=1e-4)


def _gap(logits, anchors=ANCHORS):
    logp = torch.log_softmax(logits.double(), -1)
    return (torch.logsumexp(logp[:, list(anchors.positive)], -1)
            - torch.logsumexp(logp[:, list(anchors.negative)], -1))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_steering_raises_the_gap_and_zero_steps_change_nothing(arch):
    model = make_model(arch)
    ids = _prompt(batch=3)
    with torch.no_grad():
        plain = model(ids).logits[:, -1]
        with ak.hf.steer(model, ANCHORS, CONFIG):
            steered = model(ids).logits[:, -1]
        with ak.hf.steer(model, ANCHORS, ak.SteerConfig(steps=0, margin=None)):
            unchanged = model(ids).logits[:, -1]
            unchanged_tokens = _generate(model, ids)
        plain_tokens = _generate(model, ids)
    assert bool((_gap(steered) > _gap(plain) + 0.5).all())
    assert torch.equal(unchanged, plain) and torch.equal(unchanged_tokens, plain_tokens)


def test_model_is_restored_after_exit_and_after_an_exception():
    model = make_model("llama")
    ids = _prompt()
    head = model.get_output_embeddings()
    with torch.no_grad():
        plain = model(ids).logits
        with ak.hf.steer(model, ANCHORS, CONFIG):
            pass
        assert not head._forward_pre_hooks and torch.equal(model(ids).logits, plain)
        with pytest.raises(RuntimeError, match="boom"):
            with ak.hf.steer(model, ANCHORS, CONFIG):
                model(ids)
                raise RuntimeError("boom")
        assert not head._forward_pre_hooks and torch.equal(model(ids).logits, plain)


def test_blocks_exited_out_of_order_keep_the_open_one_steering():
    """Enter A, enter B, exit A: B still steers (alone), and one object cannot be entered twice."""
    model = make_model("llama")
    ids = _prompt()
    other = ak.AnchorSet(positive=[7], negative=[8])
    with torch.no_grad():
        plain = model(ids).logits
        with ak.hf.steer(model, other, CONFIG):
            only_b = model(ids).logits
        a, b = ak.hf.steer(model, ANCHORS, CONFIG), ak.hf.steer(model, other, CONFIG)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        assert torch.equal(model(ids).logits, only_b)
        with pytest.raises(RuntimeError, match="already entered"):
            b.__enter__()
        b.__exit__(None, None, None)
        assert torch.equal(model(ids).logits, plain)
        with b:  # entered again after its exit: a new block
            assert torch.equal(model(ids).logits, only_b)
        assert not model.get_output_embeddings()._forward_pre_hooks


def test_bank_with_padding_beam_search_and_sampling():
    model = make_model("qwen2")
    ids = _prompt(batch=3)
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = 0, 0  # left padding
    bank = ak.AnchorBank([ANCHORS, ak.AnchorSet([7, 8], [30, 31, 32])])
    kw = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with ak.hf.steer(model, bank, CONFIG, row_sets=[0, -1, 1]):
            steered = model.generate(ids, **kw)
            beams = model.generate(ids, num_beams=2, num_return_sequences=2, **kw)
            torch.manual_seed(0)
            sampled = model.generate(ids, **{**kw, "do_sample": True, "top_k": 5})
    assert torch.equal(steered[1], plain[1])          # request 1 asked for no steering
    assert not torch.equal(steered[0], plain[0])
    assert beams.shape[0] == 6 and sampled.shape == steered.shape
    with pytest.raises(ValueError, match="does not divide the batch"):
        with ak.hf.steer(model, bank, CONFIG, row_sets=[0, 1]):
            model.generate(ids, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_generation_runs(dtype):
    model = make_model("llama", dtype)
    with torch.no_grad(), ak.hf.steer(model, ANCHORS, CONFIG):
        out = _generate(model, _prompt())
    assert out.shape == (2, 11)


def test_logit_steerer_errors():
    model = make_model("llama")
    steerer = ak.hf.logit_steerer(model, ANCHORS, CONFIG)
    with pytest.raises(ValueError, match="logits must be"):
        steerer(torch.zeros(2, V + 1))
    trust = ak.hf.logit_steerer(model, ANCHORS, ak.SteerConfig(eta=0.003, max_norm=0.1, margin=None), with_hidden_norm=True)
    with pytest.raises(ValueError, match="need ..h0.., which logits do not carry"):
        trust(torch.zeros(2, V))
    torch.testing.assert_close(trust(torch.zeros(2, V), hidden_norm=torch.zeros(2)), torch.zeros(2, V))
    for bad in (-1.0, float("nan"), float("inf")):  # would reverse or disable the trust region
        with pytest.raises(ValueError, match="hidden_norm entries must be finite and >= 0"):
            trust(torch.zeros(2, V), hidden_norm=torch.tensor([1.0, bad]))
    with pytest.raises(TypeError, match="steerer must be a LogitSteerer"):
        ak.hf.AnchorLogitsProcessor(model, ANCHORS, CONFIG)
    with pytest.raises(TypeError, match="config must be a SteerConfig"):
        ak.hf.logit_steerer(model, ANCHORS, {"steps": 2})


# --- anchor sets from words, with tokenizers built offline -------------------------------------

CORPUS = ["the happy kind honest people are safe and good", "we hate the stupid cruel violent kill",
          "a kind word is a safe word", "the honest answer was kind and helpful"] * 40


def _byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def _metaspace_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    return tok  # a bare tokenizers.Tokenizer is accepted too


@pytest.mark.parametrize("build,mark", [(_byte_level_bpe, "Ġ"), (_metaspace_bpe, "▁")])
def test_from_words(build, mark):
    tok = build()
    anchors = ak.AnchorSet.from_words(tok, positive=["kind", "honest", "safe", "zzyzx"],
                                      negative=["hate", "stupid", "kill"])
    vocab = tok.get_vocab()
    assert vocab[mark + "kind"] in anchors.positive and vocab[mark + "hate"] in anchors.negative
    assert len(set(anchors.positive)) == len(anchors.positive)
    assert "zzyzx" in anchors.report.dropped and "kind" in anchors.report.kept
    assert all(tok.decode([i]).strip().lower() == "kind" for _, i in anchors.report.kept["kind"])
    first = ak.AnchorSet.from_words(tok, positive=["kind", "zzyzx"], negative=["hate"], multi_token="first")
    assert "zzyzx" in first.report.kept and len(first.positive) > len(
        ak.AnchorSet.from_words(tok, positive=["kind"], negative=["hate"]).positive)
    with pytest.raises(ValueError, match="both positive and negative"):
        ak.AnchorSet.from_words(tok, positive=["kind", "good"], negative=["kind"])
    with pytest.raises(ValueError, match="no negative word maps"):
        ak.AnchorSet.from_words(tok, positive=["kind"], negative=["qqqq"])
    with pytest.raises(TypeError, match="list of words"):
        ak.AnchorSet.from_words(tok, positive="kind", negative=["hate"])


def test_lexicons_ship_with_provenance_and_map_to_tokens():
    from anchor_kernels import lexicons

    assert {"harmless", "positive_sentiment", "honest"} <= set(lexicons.names())
    for name in lexicons.names():
        lexicon = lexicons.load(name)
        assert lexicon["positive"] and lexicon["negative"] and lexicon["provenance"]
        assert all("licence" in p for p in lexicon["provenance"])
        assert not set(lexicon["positive"]) & set(lexicon["negative"])
    tok = _byte_level_bpe()
    anchors = ak.AnchorSet.from_lexicon(tok, "harmless")
    vocab = tok.get_vocab()
    assert vocab["Ġsafe"] in anchors.positive and vocab["Ġkill"] in anchors.negative
    with pytest.raises(ValueError, match="unknown lexicon"):
        lexicons.load("evil")


def test_shipped_lexicons_are_what_the_script_derives(tmp_path, monkeypatch):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("better_profanity")
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("build_lexicons", root / "scripts" / "build_lexicons.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "OUT", tmp_path)
    script.main()
    for built in tmp_path.glob("*.json"):
        assert built.read_text() == (root / "anchor_kernels" / "lexicons" / built.name).read_text(), built.name
