"""Anchor token ids from words, for any Hugging Face tokenizer (or a ``tokenizers.Tokenizer``).

Each word is tried in its surface forms: as is, with a leading space, capitalised, and
capitalised with a leading space. Byte-level BPE vocabularies spell a leading space "Ġ" and
SentencePiece ones "▁". The tokenizer's own encoder handles both, and a direct vocabulary
lookup of the marked spellings catches forms the encoder splits differently. A form that is
one token that decodes back to the word is kept. Special tokens (``<|endoftext|>``, BOS/EOS/pad,
added control tokens) are never anchors: pass their ids to ``AnchorSet`` directly if you mean it. A word with no single-token form is dropped (``multi_token="drop"``,
the default: its first sub-token is often a fragment such as "Ġun" that would steer unrelated
words), or contributes its first sub-token (``multi_token="first"``). Duplicate ids are kept
once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MULTI_TOKEN = ("drop", "first")
SPACE_MARKS = ("Ġ", "▁")


@dataclass
class WordReport:
    kept: dict[str, list[tuple[str, int]]] = field(default_factory=dict)   # word -> [(token, id)]
    dropped: dict[str, str] = field(default_factory=dict)                  # word -> why

    def __str__(self) -> str:
        kept = ", ".join(f"{w}: {[t for t, _ in forms]}" for w, forms in self.kept.items())
        dropped = ", ".join(f"{w} ({why})" for w, why in self.dropped.items())
        return f"kept {len(self.kept)} words [{kept}]; dropped {len(self.dropped)} [{dropped}]"


def _encode(tokenizer, text: str) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def _special_ids(tokenizer) -> set[int]:
    """Ids of special and added control tokens, for HF tokenizers and ``tokenizers.Tokenizer``."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        added = tokenizer.get_added_tokens_decoder()
    for i, tok in (added or {}).items():
        if getattr(tok, "special", True):
            ids.add(int(i))
    return ids


def _surface_forms(word: str) -> list[str]:
    forms = [word, " " + word, word.capitalize(), " " + word.capitalize()]
    return list(dict.fromkeys(forms))


def token_ids_for_words(tokenizer, words, multi_token: str = "drop", report: WordReport | None = None,
                        name: str = "words") -> list[int]:
    if multi_token not in MULTI_TOKEN:
        raise ValueError(f"multi_token must be one of {MULTI_TOKEN}, got {multi_token!r}")
    if isinstance(words, (str, bytes)):
        raise TypeError(f"{name} must be a list of words, not a single string")
    try:
        words = list(words)
    except TypeError:
        raise TypeError(f"{name} must be a list of words, got {type(words).__name__}") from None
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"{name} must hold strings, got {word!r} ({type(word).__name__})")
    if not callable(getattr(tokenizer, "get_vocab", None)) or not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (or a tokenizers.Tokenizer), got "
                        f"{type(tokenizer).__name__}")
    report = WordReport() if report is None else report
    vocab = tokenizer.get_vocab()
    id_to_token = {i: t for t, i in vocab.items()}
    special = _special_ids(tokenizer)
    ids: list[int] = []
    for word in words:
        word = word.strip()
        if not word:
            continue
        found: dict[int, str] = {}
        first_pieces = []
        for form in _surface_forms(word):
            pieces = _encode(tokenizer, form)
            # One token that decodes back to the word: an encoder without an unknown token
            # may silently drop characters and leave just a space marker.
            if len(pieces) == 1 and tokenizer.decode([pieces[0]]).strip() == form.strip():
                found.setdefault(pieces[0], id_to_token.get(pieces[0], form))
            elif pieces:
                first_pieces.append(pieces[0])
            bare = form.lstrip(" ")
            for token in [bare] + ([m + bare for m in SPACE_MARKS] if form.startswith(" ") else []):
                if token in vocab:
                    found.setdefault(vocab[token], token)
        found = {i: t for i, t in found.items() if i not in special}
        first_pieces = [i for i in first_pieces if i not in special]
        if not found and multi_token == "first" and first_pieces:
            found[first_pieces[0]] = id_to_token.get(first_pieces[0], "?")
        if not found:
            report.dropped[word] = "no single-token form" if first_pieces else "not in the vocabulary"
            continue
        report.kept[word] = [(tok, i) for i, tok in found.items()]
        ids.extend(i for i in found if i not in ids)
    return ids


def anchor_set_from_words(cls, tokenizer, positive, negative, multi_token: str = "drop"):
    report = WordReport()
    pos = token_ids_for_words(tokenizer, positive, multi_token, report, "positive")
    neg = token_ids_for_words(tokenizer, negative, multi_token, report, "negative")
    clash = sorted(set(pos) & set(neg))
    if clash:
        owners = {w: [t for t, i in forms if i in clash] for w, forms in report.kept.items()
                  if any(i in clash for _, i in forms)}
        raise ValueError(f"tokens {clash} come from both positive and negative words: {owners}")
    if not pos:
        raise ValueError(f"no positive word maps to a token: {report}")
    if not neg:
        raise ValueError(f"no negative word maps to a token: {report}")
    anchors = cls(positive=pos, negative=neg)
    object.__setattr__(anchors, "report", report)  # not a field: equality ignores it
    return anchors
