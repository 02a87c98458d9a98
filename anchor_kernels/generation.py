"""Steered generation and its analysis on a local HF causal LM (the embedded one by default):
what the CLI's generate, gap and eval commands run."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lexicons
from .anchors import AnchorSet
from .config import SteerConfig

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "eval_prompts.txt"


def load_model(path: Path | str | None = None, dtype=torch.float32):
    """(model, tokenizer) from a local folder; never from a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else DEFAULT_MODEL
    if not (path / "config.json").is_file():
        hint = " (the embedded model is built by scripts/train_default_model.py)" if path == DEFAULT_MODEL else ""
        raise FileNotFoundError(f"no HF model folder at {path}: config.json is missing{hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a broken config.json, missing weights
        raise ValueError(f"could not load the HF model folder {path}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def anchors_for(tokenizer, lexicon: str | None, positive=None, negative=None) -> AnchorSet:
    if positive or negative:
        if not (positive and negative):
            raise ValueError("give both --positive and --negative words, or a --lexicon")
        return AnchorSet.from_words(tokenizer, positive, negative)
    return AnchorSet.from_lexicon(tokenizer, lexicon or "positive_sentiment")


@dataclass
class Generation:
    texts: list[str]             # continuations only
    token_ids: list[list[int]]   # continuation ids per prompt (padding removed)
    logits: torch.Tensor         # [B, steps, V] raw next-token logits (the steered ones when steered)


class LogitBias:
    """The baseline: +bias on positive anchor logits, -bias on negative ones."""

    def __init__(self, anchors: AnchorSet, bias: float, vocab: int):
        self.vector = torch.zeros(vocab)
        self.vector[list(anchors.positive)] = bias
        self.vector[list(anchors.negative)] = -bias

    def __call__(self, input_ids, scores):
        return scores + self.vector.to(scores.device, scores.dtype)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, *, anchors=None,
             config: SteerConfig | None = None, backend: str = "auto", logit_bias: float = 0.0,
             sample: bool = True) -> Generation:
    from transformers import LogitsProcessorList

    from . import hf

    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    processors = LogitsProcessorList()
    if logit_bias:
        processors.append(LogitBias(anchors, logit_bias, model.config.vocab_size))
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=sample,
              pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True,
              logits_processor=processors)
    if sample:
        kw.update(top_k=40, temperature=0.8)
    torch.manual_seed(seed)
    if config is not None and anchors is not None:
        with hf.steer(model, anchors, config, backend=backend):
            out = model.generate(**batch, **kw)
    else:
        out = model.generate(**batch, **kw)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1).float()
    if logit_bias:  # the distribution actually sampled from
        logits = logits + processors[0].vector.to(logits.device)
    ids = new.tolist()
    return Generation([tokenizer.decode(r, skip_special_tokens=True) for r in ids], ids, logits)


def mean_logit_gap(logits: torch.Tensor, anchors: AnchorSet) -> torch.Tensor:
    """The paper's measure: mean positive minus mean negative anchor logit, ``[..., V] -> [...]``."""
    return logits[..., list(anchors.positive)].mean(-1) - logits[..., list(anchors.negative)].mean(-1)


@torch.no_grad()
def continuation_perplexity(model, tokenizer, prompts: list[str], gen: Generation) -> float:
    """Perplexity of the continuations under ``model`` (unsteered): the fluency cost."""
    nll, count = 0.0, 0
    for prompt, ids in zip(prompts, gen.token_ids):
        p = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
        seq = torch.tensor([p + ids], device=model.device)
        logits = model(seq).logits[0, len(p) - 1: -1].float()
        nll += torch.nn.functional.cross_entropy(logits, seq[0, len(p):], reduction="sum").item()
        count += len(ids)
    return math.exp(nll / max(count, 1))


def negative_word_rate(texts: list[str], words: list[str]) -> float:
    bad = {w.lower() for w in words}
    tokens = [t for text in texts for t in re.findall(r"[a-z']+", text.lower())]
    return sum(t in bad for t in tokens) / max(len(tokens), 1)


def sentiment(texts: list[str]) -> float:
    """Mean VADER compound score in [-1, 1]."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise RuntimeError("eval needs vaderSentiment: pip install vaderSentiment") from exc
    analyzer = SentimentIntensityAnalyzer()
    return sum(analyzer.polarity_scores(t)["compound"] for t in texts) / max(len(texts), 1)


def lexicon_negatives(lexicon: str | None) -> list[str]:
    return lexicons.load(lexicon or "positive_sentiment")["negative"]
