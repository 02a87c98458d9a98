"""Anchor sets, anchor banks, and their per-weight preparation (ids, weights, Gram matrix).

A bank of S sets is packed padded to a common size K so that every tensor the kernels see has
a static shape (no host sync, CUDA-graph safe): ``anchor_ids [S, K]`` (int64),
``anchor_weights [S, K]`` (fp32: +alpha for positives, -beta for negatives, 0 for padding) and
``gram [S, K, K]`` (fp32, ``W_A W_A^T`` per set, zero on padding).
"""
from __future__ import annotations

import collections
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .config import FP32_MAX

# A live anchor row's squared norm ||W_a||^2 (its fp32 Gram diagonal) must be 0 or in
# [GRAM_DIAG_MIN, FP32_MAX] (csrc/kernels/fp_range.h: row norms 0 or in [9.1e-13, 1.8e19]):
# past FP32_MAX the Gram is not finite, below GRAM_DIAG_MIN the fp32 Gram and the kernels'
# quadratic forms of it lose their accuracy. A set with another anchor row cannot steer: every
# backend leaves its rows untouched, and the host refuses it (check_finite_anchors).
GRAM_DIAG_MIN = 2.0**-80


def gram_diag_ok(diag: torch.Tensor) -> torch.Tensor:
    """Where the Gram diagonal entries ``diag`` (fp32) are ones the kernels can steer with."""
    return (diag == 0) | ((diag >= GRAM_DIAG_MIN) & (diag <= FP32_MAX))


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
    dup = sorted(t for t, n in collections.Counter(out).items() if n > 1)
    if dup:
        raise ValueError(f"{name} holds duplicate token ids {dup}")
    return tuple(out)


def _set_weights(weights, n: int, name: str) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / n,) * n
    if isinstance(weights, torch.Tensor):
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a {weights.dtype} tensor")
        weights = weights.flatten().tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a sequence of positive numbers, got {type(weights).__name__}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{name} must hold real numbers, got {w!r}")
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{name} has {len(weights)} entries but its set has {n} token ids")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"{name} must all be finite and > 0, got {weights}")
    # Normalise by the largest first: the sum of huge weights would overflow to inf.
    top = max(weights)
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    out = tuple(w / total for w in scaled)
    # The kernels hold weights in fp32, and log(w) must stay finite there.
    if min(out) < 1e-30:
        raise ValueError(f"{name}: the smallest normalised weight {min(out):.3g} is below 1e-30, "
                         "which fp32 kernels cannot represent; drop that token instead")
    return out


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


def compact_bank(anchors) -> tuple[list[int], AnchorBank]:
    """The token ids ``anchors`` use (sorted) and the same bank renumbered onto rows 0..n-1 of
    ``W[ids]``: steering reads only the anchor rows of W, so a caller that holds those rows alone
    (a tensor-parallel rank, whose shard of W lacks most of them) steers with ``W[ids]``."""
    bank = as_bank(anchors)
    ids = sorted({t for s in bank.sets for t in s.ids})
    row = {t: i for i, t in enumerate(ids)}
    return ids, AnchorBank([AnchorSet([row[t] for t in s.positive], [row[t] for t in s.negative],
                                      s.positive_weights, s.negative_weights) for s in bank.sets])


def as_bank(anchors) -> AnchorBank:
    if isinstance(anchors, AnchorBank):
        return anchors
    if isinstance(anchors, AnchorSet):
        return AnchorBank([anchors])
    raise TypeError(f"anchors must be an AnchorSet or AnchorBank, got {type(anchors).__name__}")


class PreparedAnchors(NamedTuple):
    """A bank packed for one LM-head weight, on that weight's device: a snapshot.

    The Gram matrices are computed from the weight's values when it is built. ``steer_hidden``
    checks that the weight it is given matches what the handle was built for (vocabulary, d,
    dtype, device, storage and, where torch tracks it, the version counter, so an in-place
    update is caught), but writes that bypass the version counter (through ``.numpy()``, or a
    ``.data`` swap onto the same address) cannot be seen: after changing the weight, call
    ``prepare_anchors`` again. Inside torch.compile, where neither can be read, the anchor rows'
    norms are compared with the Gram's diagonal instead. ``direction`` depends on the anchor
    weights too: a handle whose fields are replaced (``_replace``) must be built anew.
    """

    anchor_ids: torch.Tensor      # [S, K] int64
    anchor_weights: torch.Tensor  # [S, K] fp32, signed, 0 = padding
    gram: torch.Tensor            # [S, K, K] fp32
    vocab: int = -1               # V of the weight it was built for
    source: tuple = ()            # (data_ptr, version or None, shape, dtype, device) of that weight
    # [S, d] fp32, u = W_A^T w per set: objective="mean" is rank one (METHOD.md), so its kernels
    # need only this direction, computed here once instead of from K anchor rows on every call.
    direction: torch.Tensor | None = None

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the ops take: ``anchor_ids, anchor_weights, gram``."""
        return self.anchor_ids, self.anchor_weights, self.gram

    def to_bank(self) -> AnchorBank:
        """The bank these tensors were packed from (reads them back to the host)."""
        sets = []
        for ids, w in zip(self.anchor_ids.tolist(), self.anchor_weights.tolist()):
            sets.append(AnchorSet(positive=[i for i, x in zip(ids, w) if x > 0],
                                  negative=[i for i, x in zip(ids, w) if x < 0],
                                  positive_weights=[x for x in w if x > 0],
                                  negative_weights=[-x for x in w if x < 0]))
        return AnchorBank(sets)

    def check_weight(self, weight: torch.Tensor) -> None:
        """Raises if ``weight`` is not (any more) the weight this handle was built for."""
        if self.anchor_ids.device != weight.device:
            raise ValueError(f"anchors were prepared on {self.anchor_ids.device} but weight is on "
                             f"{weight.device}: call prepare_anchors(weight, anchors) for this weight")
        if self.vocab != weight.shape[0]:
            raise ValueError(f"anchors were prepared for a weight with V = {self.vocab} rows, but weight "
                             f"has V = {weight.shape[0]}: call prepare_anchors(weight, anchors) for this weight")
        if torch.compiler.is_compiling():
            self._check_rows_in_graph(weight)
            return
        if not self.source:
            return
        ptr, version, shape, dtype, device = self.source
        if (ptr, shape, dtype, device) != (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device):
            raise ValueError("anchors were prepared for another weight tensor (storage, shape, dtype or "
                             "device differ): call prepare_anchors(weight, anchors) for this weight")
        if version is not None and _version(weight) != version:
            raise ValueError("weight was modified in place since prepare_anchors built these anchors "
                             "(its version counter moved): call prepare_anchors(weight, anchors) again")

    def _check_rows_in_graph(self, weight: torch.Tensor) -> None:
        # A graph cannot read data pointers or version counters, so compare the anchor rows'
        # squared norms (one read of the K rows, fused) with the Gram's diagonal, on the device:
        # a rescaled or rewritten anchor row raises instead of steering with a stale Gram. (On
        # CUDA this is a device-side assertion, fatal to the process as any is.) Norm-preserving
        # rewrites of anchor rows are not seen.
        live = self.anchor_weights != 0
        norms = torch.where(live, weight[self.anchor_ids].float().pow(2).sum(-1), 0.0)
        same = torch.isclose(norms, self.gram.diagonal(dim1=1, dim2=2), rtol=1e-3, atol=0.0, equal_nan=True)
        torch._assert_async(same.all(), "weight's anchor rows changed since prepare_anchors built these anchors "
                                        "(checked inside torch.compile): call prepare_anchors(weight, anchors) again")


def _version(weight: torch.Tensor) -> int | None:
    # Inference tensors (weights loaded under torch.inference_mode) have no version counter.
    return None if weight.is_inference() else weight._version


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
    # where, not a product: padding must never read a real row (0 * NaN would be NaN).
    with torch.no_grad():  # not weight.detach(): that is a [V, d] tensor, if only a view
        rows = torch.where((weights != 0).unsqueeze(-1), weight[ids].double(), 0.0)
        gram = torch.bmm(rows, rows.transpose(1, 2)).float()
        direction = torch.bmm(weights.unsqueeze(1), rows).squeeze(1).float()
    check_finite_anchors(weight, ids, weights != 0)
    source = () if torch.compiler.is_compiling() else (
        weight.data_ptr(), _version(weight), tuple(weight.shape), weight.dtype, weight.device)
    return PreparedAnchors(ids, weights.float(), gram, int(weight.shape[0]), source, direction)


def check_finite_anchors(weight: torch.Tensor | None, ids: torch.Tensor, live: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> None:
    """Every backend leaves the rows of a set with a non-finite anchor row of W untouched (its
    Gram is not finite), those with an anchor row whose squared norm fp32 cannot hold for the Gram
    (``gram_diag_ok``: ||W_a|| past 1.8e19, or nonzero below 9.1e-13), and those with a NaN or +inf
    anchor bias entry too (their gap is not finite): steering would silently do nothing. Where
    checking costs no device sync (CPU tensors, not tracing) that is an error naming the token
    ids. ``live``: which ``ids`` count. ``weight=None`` checks the bias only (the rows of W were
    checked when the bank was packed)."""
    device = (weight if weight is not None else bias if bias is not None else ids).device
    if device.type != "cpu" or torch.compiler.is_compiling() or (weight is None and bias is None):
        return
    ids = (ids if live is None else ids[live]).flatten().unique()
    with torch.no_grad():
        bad = torch.zeros(ids.shape, dtype=torch.bool)
        if weight is not None:
            bad |= ~torch.isfinite(weight[ids]).all(-1)
        if bias is not None:
            bad |= ~torch.isfinite(bias[ids])
    if bool(bad.any()):
        raise ValueError(f"weight's rows{'' if bias is None else ' or bias entries'} for anchor token ids "
                         f"{ids[bad].tolist()} are not finite (NaN or inf): a set with such an anchor cannot "
                         "steer; drop those tokens or fix the weight")
    if weight is not None:
        with torch.no_grad():  # the Gram's diagonal as _pack computes it: fp64, rounded to fp32
            sq = weight[ids].double().pow(2).sum(-1).float()
        out = ~gram_diag_ok(sq)
        if bool(out.any()):
            raise ValueError(
                f"weight's rows for anchor token ids {ids[out].tolist()} have squared norms "
                f"{[float(f'{x:.3g}') for x in sq[out].tolist()]} that the fp32 Gram W_A W_A^T cannot hold: "
                f"each ||W_a||^2 must be 0 or in [2^-80, {FP32_MAX:.4g}] (row norms in [9.1e-13, 1.8e19]), "
                "or the kernels cannot steer with its set; rescale the weight or drop those tokens")


def prepare_anchors(weight: torch.Tensor, anchors) -> PreparedAnchors:
    """Pack ``anchors`` for ``weight`` ([V, d]) and compute their Gram matrices, once.

    There is no hidden cache: ``steer_hidden`` given an AnchorSet or AnchorBank packs it on
    every call, so it always uses the weight's current values. Build this handle once and pass
    it as ``anchors`` where the per-call packing matters (every decoding step; inside
    torch.compile). It is a snapshot: see ``PreparedAnchors``.
    """
    if isinstance(anchors, PreparedAnchors):
        anchors.check_weight(weight)
        return anchors
    bank = as_bank(anchors)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, d] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    return _pack(bank, weight)


def anchor_gram(weight: torch.Tensor, anchors) -> torch.Tensor:
    """``Gm = W_A W_A^T`` in fp32: ``[K, K]`` for an AnchorSet, ``[S, K, K]`` (padded) for a bank."""
    gram = prepare_anchors(weight, anchors).gram
    return gram[0] if isinstance(anchors, AnchorSet) else gram
