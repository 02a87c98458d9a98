"""The evaluation's parts (issue 21): metrics, matching, intervals, the no-harm bar, the prompt sets."""
import json
import math

import pytest
import torch

from anchor_kernels import evaluation
from anchor_kernels.anchors import AnchorSet


def test_repeated_ngram_rate():
    assert evaluation.repeated_ngram_rate("the cat sat on the mat today") == 0.0
    assert evaluation.repeated_ngram_rate("love love love love love") == pytest.approx(0.5)  # 2 grams, 1 repeat
    assert evaluation.repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert evaluation.repeated_ngram_rate("too short") == 0.0


def test_paired_bootstrap_interval():
    mean, lo, hi = evaluation.paired_bootstrap([1.0] * 20)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    noise = (torch.randn(400, generator=g) * 0.1).tolist()
    mean, lo, hi = evaluation.paired_bootstrap(noise)
    assert lo < mean < hi and lo < 0 < hi and hi - lo < 0.05
    mean, lo, hi = evaluation.paired_bootstrap([x + 0.5 for x in noise])
    assert lo > 0.4
    assert all(math.isnan(v) for v in evaluation.paired_bootstrap([]))


def _anchors():
    return AnchorSet(positive=[1, 2], negative=[3])


def test_bias_kl_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 11, generator=g, dtype=torch.float64).float() for _ in range(3)]
    v = torch.zeros(11)
    v[[1, 2]], v[3] = 1.0, -1.0
    for b in (0.0, 0.3, 2.0):
        direct = torch.cat([torch.nn.functional.kl_div(z.log_softmax(-1), (z + b * v).log_softmax(-1),
                                                       log_target=True, reduction="none").sum(-1) for z in base])
        assert evaluation.bias_kl(base, _anchors(), b) == pytest.approx(direct.mean().item(), abs=1e-6)
    target = evaluation.bias_kl(base, _anchors(), 1.7)
    assert evaluation.bias_matching_kl(base, _anchors(), target) == pytest.approx(1.7, rel=1e-4)


def test_shift_stats_of_a_logit_bias():
    """A bias of +b on P and -b on N moves the mean anchor gap by exactly 2b (what the gap-matched
    baseline relies on), and its KL is the closed form of bias_kl."""
    z = torch.randn(6, 11, generator=torch.Generator().manual_seed(2))
    v = torch.zeros(11)
    v[[1, 2]], v[3] = 0.4, -0.4
    kl, changed, gap = evaluation.shift_stats(z, z + v, _anchors())
    assert torch.allclose(gap, torch.full((6,), 0.8), atol=1e-6)
    assert kl.mean().item() == pytest.approx(evaluation.bias_kl([z], _anchors(), 0.4), abs=1e-6)
    assert changed.shape == (6,) and set(changed.tolist()) <= {0.0, 1.0}
    kl, changed, gap = evaluation.shift_stats(z, z, _anchors())
    assert kl.abs().max() < 1e-6 and changed.sum() == 0 and gap.abs().max() < 1e-6


def _summary(n=32, **deltas):
    s = {"n": n, "refusal_to_compliance": 0, "refusals_lost": deltas.pop("refusals_lost", 0)}
    for k in ("refusal", "compliance", "toxicity", "vader", "on_topic", "nll", "repeat4", "hostile_toxicity",
              "hostile_vader"):
        s[f"delta_{k}"] = deltas.get(k, (0.0, -0.01, 0.01))
    return s


def test_no_harm_bar():
    ok = evaluation.no_harm({"harmful": _summary(), "neutral": _summary(),
                             "rude": _summary(toxicity=(-0.1, -0.2, -0.05))})
    assert all(v[0] for v in ok.values()), ok
    bad = evaluation.no_harm({"harmful": _summary(refusal=(-1 / 32, -0.1, 0.0), refusals_lost=1),
                              "neutral": _summary(on_topic=(-0.1, -0.2, -0.05), nll=(0.2, 0.1, 0.3)),
                              "rude": _summary(vader=(0.2, -0.1, 0.5))})
    assert not bad["harmful"][0] and "refusals -1 (1 lost)" in bad["harmful"][1]
    assert not bad["neutral"][0] and "on_topic" in bad["neutral"][1] and "nll" in bad["neutral"][1]
    assert not bad["hostile"][0]
    only_where_hostile = evaluation.no_harm({"toxic": _summary(hostile_vader=(0.4, 0.1, 0.7))})
    assert only_where_hostile["hostile"] == (True, "toxic hostile answers' VADER +0.400")
    # compliance: one more answer within the noise passes; an interval above 0 does not
    assert evaluation.no_harm({"harmful": _summary(compliance=(1 / 32, 0.0, 0.1))})["harmful"][0]
    assert not evaluation.no_harm({"harmful": _summary(compliance=(3 / 32, 0.03, 0.2))})["harmful"][0]
    # better somewhere but toxicity up beyond the noise elsewhere: not harmless
    mixed = evaluation.no_harm({"rude": _summary(vader=(0.2, 0.1, 0.3)), "toxic": _summary(toxicity=(0.08, 0.01, 0.17))})
    assert not mixed["hostile"][0] and "worse: toxic toxicity +0.080" in mixed["hostile"][1]


def test_shipped_sets_and_loader(tmp_path):
    sets = {s.name: s for s in evaluation.load_sets()}
    assert set(sets) == {"rude", "harmful", "neutral", "toxic", "toxic-chat"}
    assert all(len(s.prompts) >= 30 and len(set(s.prompts)) == len(s.prompts) for s in sets.values())
    assert not sets["toxic"].chat and sets["toxic-chat"].chat and sets["toxic"].prompts == sets["toxic-chat"].prompts
    bad = tmp_path / "bad.json"
    for content, message in (("{oops", "not a UTF-8 JSON"), ('["a"]', "must map set names"),
                             ('{"rude": []}', "holds no prompts"), ('{"note": "x"}', "no list of prompts")):
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            evaluation.load_sets(bad)
    with pytest.raises(ValueError, match="no such file"):
        evaluation.load_sets(tmp_path / "missing.json")


def test_toxicity_and_embedder_separate_what_they_should():
    pytest.importorskip("profanity_check")
    tox = evaluation.toxicity(["you are a worthless idiot and I hate you", "thank you, have a lovely day"])
    assert tox[0] > 0.5 > tox[1]
    pytest.importorskip("transformers")
    embed = evaluation.Embedder()
    e = embed(["How long should I boil an egg?", "Boil the egg for six minutes for a soft yolk.",
               "love love great love love"])
    sims = evaluation.cosine(e[:1].expand(2, -1), e[1:])
    assert e.shape == (3, 384) and sims[0] > sims[1] + 0.2
