"""Anchor sets, anchor banks, and their per-weight preparation (ids, weights, Gram matrix).

A bank of S sets is packed padded to a common size K so that every tensor the kernels see has
a static shape (no host sync, CUDA-graph safe): ``anchor_ids [S, K]`` (int64),
``anchor_weights [S, K]`` (fp32: +alpha for positives, -beta for negatives, 0 for padding) and
``gram [S, K, K]`` (fp32, ``W_A W_A^T`` per set, zero on padding).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary


def _token_ids(ids, name: str) -> tuple[int, ...]:
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a {ids.dtype} tensor")
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name} must hold integer token ids, got {t!r}")
        if t < 0:
            raise ValueError(f"{name} holds a negative token id {t}")
        out.append(int(t))
    if not out:
        raise ValueError(f"{name} must hold at least one token id")
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ValueError(f"{name} holds duplicate token ids {dup}")
    return tuple(out)


def _set_weights(weights, n: int, name: str) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / n,) * n
    if isinstance(weights, torch.Tensor):
        weights = weights.flatten().tolist()
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{name} has {len(weights)} entries but its set has {n} token ids")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"{name} must all be finite and > 0, got {weights}")
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


@dataclass(frozen=True)
class AnchorSet:
    """Positive and negative anchor token ids, each set with weights normalised to sum 1."""

    positive: tuple[int, ...]
    negative: tuple[int, ...]
    positive_weights: tuple[float, ...] | None = None
    negative_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        pos = _token_ids(self.positive, "positive")
        neg = _token_ids(self.negative, "negative")
        both = sorted(set(pos) & set(neg))
        if both:
            raise ValueError(f"token ids {both} are in both positive and negative")
        object.__setattr__(self, "positive", pos)
        object.__setattr__(self, "negative", neg)
        object.__setattr__(self, "positive_weights",
                           _set_weights(self.positive_weights, len(pos), "positive_weights"))
        object.__setattr__(self, "negative_weights",
                           _set_weights(self.negative_weights, len(neg), "negative_weights"))

    @classmethod
    def from_words(cls, tokenizer, positive, negative, multi_token: str = "drop") -> "AnchorSet":
        """Anchor set from words for any HF tokenizer (see anchor_kernels.words); the result's
        ``.report`` says which tokens each word gave and which words were dropped, and why."""
        from .words import anchor_set_from_words

        return anchor_set_from_words(cls, tokenizer, positive, negative, multi_token)

    @classmethod
    def from_lexicon(cls, tokenizer, name: str, multi_token: str = "drop") -> "AnchorSet":
        """Anchor set from a shipped lexicon: ``anchor_kernels.lexicons.names()``."""
        from . import lexicons

        lexicon = lexicons.load(name)
        return cls.from_words(tokenizer, lexicon["positive"], lexicon["negative"], multi_token)

    @property
    def size(self) -> int:
        """K = |P| + |N|."""
        return len(self.positive) + len(self.negative)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.positive + self.negative

    @property
    def signed_weights(self) -> tuple[float, ...]:
        return self.positive_weights + tuple(-w for w in self.negative_weights)


@dataclass(frozen=True)
class AnchorBank:
    """Several anchor sets served by one launch; rows pick a set with ``row_sets``."""

    sets: tuple[AnchorSet, ...]

    def __init__(self, sets: Sequence[AnchorSet]):
        sets = tuple(sets)
        if not sets:
            raise ValueError("AnchorBank needs at least one AnchorSet")
        for i, s in enumerate(sets):
            if not isinstance(s, AnchorSet):
                raise TypeError(f"AnchorBank sets[{i}] must be an AnchorSet, got {type(s).__name__}")
        object.__setattr__(self, "sets", sets)

    @property
    def num_sets(self) -> int:
        return len(self.sets)

    @property
    def size(self) -> int:
        """K of the packed bank: the largest set's size."""
        return max(s.size for s in self.sets)


def as_bank(anchors) -> AnchorBank:
    if isinstance(anchors, AnchorBank):
        return anchors
    if isinstance(anchors, AnchorSet):
        return AnchorBank([anchors])
    raise TypeError(f"anchors must be an AnchorSet or AnchorBank, got {type(anchors).__name__}")


class PreparedAnchors(NamedTuple):
    """A bank packed for one LM-head weight, on that weight's device."""

    anchor_ids: torch.Tensor      # [S, K] int64
    anchor_weights: torch.Tensor  # [S, K] fp32, signed, 0 = padding
    gram: torch.Tensor            # [S, K, K] fp32

    def to_bank(self) -> AnchorBank:
        """The bank these tensors were packed from (reads them back to the host)."""
        sets = []
        for ids, w in zip(self.anchor_ids.tolist(), self.anchor_weights.tolist()):
            sets.append(AnchorSet(positive=[i for i, x in zip(ids, w) if x > 0],
                                  negative=[i for i, x in zip(ids, w) if x < 0],
                                  positive_weights=[x for x in w if x > 0],
                                  negative_weights=[-x for x in w if x < 0]))
        return AnchorBank(sets)


def check_vocab(bank: AnchorBank, vocab: int) -> None:
    bad = sorted({t for s in bank.sets for t in s.ids if t >= vocab})
    if bad:
        raise ValueError(f"anchors hold token ids {bad} outside [0, {vocab}) (weight has V = {vocab})")


def _pack(bank: AnchorBank, weight: torch.Tensor) -> PreparedAnchors:
    check_vocab(bank, weight.shape[0])
    K = bank.size
    ids = torch.zeros(bank.num_sets, K, dtype=torch.long)
    weights = torch.zeros(bank.num_sets, K, dtype=torch.float64)
    for i, s in enumerate(bank.sets):
        ids[i, : s.size] = torch.tensor(s.ids, dtype=torch.long)
        weights[i, : s.size] = torch.tensor(s.signed_weights, dtype=torch.float64)
    ids = ids.to(weight.device)
    weights = weights.to(weight.device)
    # fp64 so that a global TF32 setting cannot degrade the Gram; it is computed once per set.
    rows = weight.detach()[ids].double() * (weights != 0).unsqueeze(-1)
    gram = torch.bmm(rows, rows.transpose(1, 2)).float()
    return PreparedAnchors(ids, weights.float(), gram)


# weight -> {bank: (version, data_ptr, prepared)}; weakly keyed so a dropped model frees it.
_cache = WeakTensorKeyDictionary()


def prepare_anchors(weight: torch.Tensor, anchors) -> PreparedAnchors:
    """Pack ``anchors`` for ``weight`` ([V, d]) and compute the Gram matrices, cached.

    The cache entry is reused only while ``weight`` is the same tensor with the same storage
    and version counter, so an in-place update, a ``.data`` swap or a move to another device
    recomputes it. Under torch.compile the cache is bypassed (dynamo cannot trace it): pass
    the result of this function, prepared outside the compiled region, as ``anchors`` instead.
    """
    if isinstance(anchors, PreparedAnchors):
        return anchors
    bank = as_bank(anchors)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, d] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if torch.compiler.is_compiling():
        return _pack(bank, weight)
    stamp = (weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape))
    per_weight = _cache.setdefault(weight, {})
    hit = per_weight.get(bank)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    prepared = _pack(bank, weight)
    per_weight[bank] = (stamp, prepared)
    return prepared


def anchor_gram(weight: torch.Tensor, anchors) -> torch.Tensor:
    """``Gm = W_A W_A^T`` in fp32: ``[K, K]`` for an AnchorSet, ``[S, K, K]`` (padded) for a bank."""
    gram = prepare_anchors(weight, anchors).gram
    return gram[0] if isinstance(anchors, AnchorSet) else gram
