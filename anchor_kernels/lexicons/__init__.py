"""Curated anchor lexicons, one per value dimension, built by scripts/build_lexicons.py from
PyPI packages (sources and licences are recorded in each file's ``provenance``)."""
from __future__ import annotations

import json
from importlib import resources


# courtesy vs hostility, with no compliance, refusal or topical words: the lexicon of the default
# that does no harm (docs/evaluation.md).
DEFAULT = "civil"


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict:
    """``{"positive": [...], "negative": [...], "description": ..., "provenance": [...]}``."""
    if name not in names():
        raise ValueError(f"unknown lexicon {name!r}; available: {names()}")
    return json.loads((resources.files(__name__) / f"{name}.json").read_text(encoding="utf-8"))
