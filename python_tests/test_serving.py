"""The server adapters' shared config: named sets, per-request arguments, the LM head read
from a checkpoint (no engine needed)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import anchor_kernels as ak
from anchor_kernels import generation
from anchor_kernels.integrations import serving
from anchor_kernels.integrations.serving import ServingConfig
from conftest import FORTUNE_MODEL

SETS = {"sunny": {"positive": ["love", "good"], "negative": ["hate", "war"]},
        "ids": {"positive_ids": [5, 9], "negative_ids": [23]},
        "harmless": {"lexicon": "harmless"}}


def test_default_is_every_shipped_lexicon_in_the_logit_form(monkeypatch):
    monkeypatch.delenv(serving.CONFIG_ENV, raising=False)
    cfg = ServingConfig.from_env()
    assert cfg.names == tuple(ak.lexicons.names()) and cfg.form == "logits"
    assert cfg.config == ak.SteerConfig(eta=serving.DEFAULT_LOGIT_STEP)


def test_from_env_reads_the_file_and_rereads_it_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sets": SETS, "config": {"steps": 3}}))
    monkeypatch.setenv(serving.CONFIG_ENV, str(path))
    assert ServingConfig.from_env().config.steps == 3
    path.write_text(json.dumps({"sets": {"ids": SETS["ids"]}, "form": "hidden"}))
    import os
    os.utime(path, (1, 1))
    cfg = ServingConfig.from_env()
    assert cfg.names == ("ids",) and cfg.form == "hidden" and cfg.config == ak.SteerConfig()
    monkeypatch.setenv(serving.CONFIG_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="cannot be read"):
        ServingConfig.from_env()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ServingConfig.from_file(bad)


@pytest.mark.parametrize("data, match", [
    ([], "JSON object"),
    ({"sets": SETS, "extra": 1}, "unknown keys"),
    ({"sets": {}}, "non-empty"),
    ({"sets": SETS, "form": "both"}, "'form'"),
    ({"sets": {"a": {"lexicon": "nope"}}}, "unknown lexicon"),
    ({"sets": {"a": {"positive": ["x"]}}}, "exactly one of"),
    ({"sets": {"a": {"lexicon": "harmless", "positive": ["x"]}}}, "exactly one of"),
    ({"sets": {"a": ["x"]}}, "must be an object"),
    ({"sets": SETS, "config": {"stepz": 1}}, "unknown fields"),
    ({"sets": SETS, "config": {"steps": -1}}, "steps"),
    ({"sets": SETS, "config": {"strength": 0.003}}, "logit form cannot use .strength. \\(the relative step"),
    ({"sets": SETS, "config": {"strength": 0.003, "eta": 0.1}}, "logit form cannot use .strength."),
    ({"sets": SETS, "form": "hidden", "config": {"strength": 0.003, "eta": 0.1}}, "not both"),
    ({"sets": SETS, "config": {"max_norm": 0.1}}, "logit form cannot"),
    ({"sets": SETS, "config": {"eta": -1}}, "eta must be >= 0"),
    ({"sets": SETS, "config": {"step_size": 0.05, "relative_step": False}},
     "step_size was ambiguous and is removed.*Here: eta=0.05"),
    ({"sets": SETS, "form": "hidden", "config": {"step_size": 0.01}},
     "step_size was ambiguous and is removed.*Here: strength=0.01"),
    ({"sets": SETS, "config": {"relative_step": True}}, "step_size was ambiguous and is removed"),
    ({"sets": {"a": {"positive": "love", "negative": ["hate"]}}}, "set 'a': 'positive' must be a non-empty list of words"),
    ({"sets": {"a": {"positive": ["love"], "negative": []}}}, "set 'a': 'negative' must be a non-empty list"),
    ({"sets": {"a": {"positive_ids": [1, "2"], "negative_ids": [3]}}}, "'positive_ids' must be a non-empty list of token ids"),
    ({"sets": {"a": {"positive_ids": [1], "negative_ids": 3}}}, "'negative_ids' must be a non-empty list of token ids"),
    ({"sets": {"a": {"lexicon": ["harmless"]}}}, "unknown lexicon"),
    ({"sets": {"a": {"lexicon": "harmless", "step": -0.1}}}, "set 'a' 'step' must be a number.*literal"),
    ({"sets": {"a": {"lexicon": "harmless", "step": "big"}}}, "set 'a' 'step' must be a number"),
    ({"sets": {"a": {"lexicon": "harmless", "step": 1e5}}, "form": "hidden"}, "set 'a' 'step'.*relative"),
    ({"sets": {"a": {"step": 0.1}}}, "exactly one of"),
])
def test_bad_configs_are_refused_with_the_reason(data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ServingConfig.from_dict(data)


def test_request_arguments():
    cfg = ServingConfig.from_dict({"sets": SETS})
    assert cfg.request(None) is None and cfg.request({}) is None and cfg.request({"seed_x": 1}) is None
    assert cfg.request({"anchor_set": "ids"}) == (1, serving.DEFAULT_LOGIT_STEP)
    assert cfg.request({"anchor_set": "harmless", "anchor_step_size": 0}) == (2, 0.0)
    for args, match in [({"anchor_set": "x"}, "not a configured"), ({"anchor_set": 3}, "not a configured"),
                        ({"anchor_set": "ids", "anchor_step_size": True}, "anchor_step_size"),
                        ({"anchor_set": "ids", "anchor_step_size": float("inf")}, "anchor_step_size"),
                        ({"anchor_set": "ids", "anchor_step_size": 1e39}, "anchor_step_size"),
                        ({"anchor_set": "ids", "anchor_step_size": "0.1"}, "anchor_step_size. must be a number"),
                        ({"anchor_step_size": 1.0}, "needs"), ({"anchor_steps": 1}, "unknown steering"),
                        ("harmless", "must be an object")]:
        with pytest.raises(ValueError, match=match):
            cfg.request(args)


def test_the_step_is_named_by_its_form_and_requests_say_which():
    """A config names its step "eta" (literal) or "strength" (relative); a request's
    anchor_step_size replaces it in that form, and a refused one says which form it is."""
    logit = ServingConfig.from_dict({"sets": SETS, "config": {"eta": 0.2}})
    assert logit.config == ak.SteerConfig(eta=0.2) and logit.request({"anchor_set": "ids"}) == (1, 0.2)
    hidden = ServingConfig.from_dict({"sets": SETS, "form": "hidden", "config": {"strength": 0.01}})
    assert hidden.config == ak.SteerConfig(strength=0.01) and hidden.request({"anchor_set": "ids"}) == (1, 0.01)
    hidden_literal = ServingConfig.from_dict({"sets": SETS, "form": "hidden", "config": {"eta": 0.4}})
    assert not hidden_literal.config.relative_step
    assert ServingConfig.from_dict({"sets": SETS, "form": "hidden"}).config == ak.SteerConfig()
    for cfg, form in ((logit, "literal .SteerConfig eta"), (hidden_literal, "literal .SteerConfig eta"),
                      (hidden, "relative .SteerConfig strength")):
        with pytest.raises(ValueError, match=f"anchor_step_size.*this server's step is {form}"):
            cfg.request({"anchor_set": "ids", "anchor_step_size": -1})


def test_a_set_may_carry_its_own_default_step():
    """A set's "step" (in the config's form) is what a request naming it gets without
    anchor_step_size; the request's own step still wins; other sets keep the config's."""
    sets = {**SETS, "mild": {"lexicon": "civil", "step": 0.02}}
    for form, base in (("logits", serving.DEFAULT_LOGIT_STEP), ("hidden", ak.SteerConfig().strength)):
        cfg = ServingConfig.from_dict({"sets": sets, "form": form})
        mild = cfg.names.index("mild")
        assert cfg.request({"anchor_set": "mild"}) == (mild, 0.02) and cfg.set_step("mild") == 0.02
        assert cfg.request({"anchor_set": "mild", "anchor_step_size": 0.5}) == (mild, 0.5)
        assert cfg.request({"anchor_set": "ids"}) == (1, base) and cfg.set_step("ids") == base


def test_bank_resolves_words_with_the_tokenizer():
    _, tok = generation.load_model(FORTUNE_MODEL)
    bank = ServingConfig.from_dict({"sets": SETS}).bank(tok)
    assert bank.num_sets == 3
    assert bank.sets[0] == ak.AnchorSet.from_words(tok, ["love", "good"], ["hate", "war"])
    assert bank.sets[1] == ak.AnchorSet([5, 9], [23])
    with pytest.raises(ValueError, match="anchor set 'a'"):
        ServingConfig.from_dict({"sets": {"a": {"positive": ["qqqqzz"], "negative": ["hate"]}}}).bank(tok)
    with pytest.raises(ValueError, match=r"anchor set 'ids': token ids \[9, 23\] are outside the model's vocabulary \[0, 9\)"):
        ServingConfig.from_dict({"sets": {"ids": SETS["ids"]}}).bank(tok, vocab=9)


def test_read_lm_head_untied_tied_and_sharded(tmp_path):
    head, emb = torch.randn(7, 3, dtype=torch.bfloat16), torch.randn(7, 3, dtype=torch.bfloat16)
    untied = tmp_path / "untied"
    untied.mkdir()
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": head}, untied / "model.safetensors")
    got = serving.read_lm_head(untied)
    assert got.dtype == torch.bfloat16 and torch.equal(got, head)
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({"model.embed_tokens.weight": emb}, tied / "model.safetensors")
    assert torch.equal(serving.read_lm_head(tied), emb)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"model.embed_tokens.weight": emb}, sharded / "a.safetensors")
    save_file({"lm_head.weight": head}, sharded / "b.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}))
    assert torch.equal(serving.read_lm_head(sharded), head)
    assert torch.equal(serving.read_lm_head(FORTUNE_MODEL).float(),
                       generation.load_model(FORTUNE_MODEL)[0].lm_head.weight)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        serving.read_lm_head(empty)
    save_file({"other": emb}, empty / "model.safetensors")
    with pytest.raises(ValueError, match="no LM head"):
        serving.read_lm_head(empty)
    # What the tensor-parallel hidden form checks when the engine starts.
    biased = tmp_path / "biased"
    biased.mkdir()
    save_file({"lm_head.weight": head, "lm_head.bias": head[:, 0].contiguous()}, biased / "model.safetensors")
    assert serving.has_lm_head_bias(biased)
    assert not any(serving.has_lm_head_bias(d) for d in (untied, tied, sharded, FORTUNE_MODEL))
    with pytest.raises(ValueError, match="cannot read the checkpoint's tensor names"):
        serving.has_lm_head_bias(tmp_path / "missing")


@pytest.mark.parametrize("objective", ["lse", "mean"])
def test_request_steps_are_bounded_to_what_keeps_logits_finite(objective):
    """3.4e38 made a request's logits non-finite; the bound is refused by name, and the largest
    accepted step keeps the fortune model's logits finite."""
    # ungated (margin none): every row must take the largest step
    cfg = ServingConfig.from_dict({"sets": SETS, "config": {"objective": objective, "steps": 50, "margin": None}})
    with pytest.raises(ValueError, match="'anchor_step_size' must be a number in \\[0, 10000\\]"):
        cfg.request({"anchor_set": "ids", "anchor_step_size": 3.4e38})
    with pytest.raises(ValueError, match="'config' eta must be a number in"):
        ServingConfig.from_dict({"sets": SETS, "config": {"eta": 1e5}})
    with pytest.raises(ValueError, match="'config' strength must be a number in"):
        ServingConfig.from_dict({"sets": SETS, "form": "hidden", "config": {"strength": 1e5}})
    reg = ServingConfig.from_dict({"sets": SETS, "config": {"reg": 0.5}})
    with pytest.raises(ValueError, match="'anchor_step_size' = 5 times reg = 0.5 exceeds 2.*<= 4"):
        reg.request({"anchor_set": "ids", "anchor_step_size": 5})
    steering = cfg.request({"anchor_set": "ids", "anchor_step_size": serving.MAX_STEP_SIZE})
    model, tok = generation.load_model(FORTUNE_MODEL)
    head = serving.read_lm_head(FORTUNE_MODEL).float()
    steerer = ak.LogitSteerer(head, cfg.bank(tok), cfg.config, backend="eager")
    logits = torch.randn(3, head.shape[0], generator=torch.Generator().manual_seed(0)) * 20
    out = steerer(logits, row_sets=[steering.set_index] * 3, step_size=[steering.step_size] * 3)
    assert torch.isfinite(out).all() and not torch.equal(out, logits)
