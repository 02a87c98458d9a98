"""What the server adapters (vLLM, SGLang) share: named anchor sets configured once per server,
the per-request arguments that pick one, and the LM head read from the checkpoint.

A server's steering is a JSON file named by ``$ANCHOR_KERNELS_SERVING_CONFIG``::

    {
      "model": "/path/to/checkpoint",          # only for engines that do not say (SGLang)
      "form": "logits",                       # or "hidden" (vLLM: the exact hidden-state edit)
      "config": {"steps": 10, "eta": 0.05},   # SteerConfig fields: "eta" or "strength", see below
      "sets": {
        "harmless": {"lexicon": "harmless"},                               # a shipped lexicon
        "polite":   {"positive": ["kind", "polite"], "negative": ["rude"]},  # words
        "raw":      {"positive_ids": [101, 102], "negative_ids": [7]},       # token ids
        "mild":     {"lexicon": "civil", "step": 0.03}   # its own default step (the config's form)
      }
    }

Without the variable every shipped lexicon is a set (``anchor_kernels.lexicons.names()``) with
the form's default step. A request names a set and, optionally, its own step size; a request that
names nothing is not touched::

    {"anchor_set": "harmless", "anchor_step_size": 0.08}

The step is named by its form, as in ``SteerConfig``: ``"eta"`` is METHOD.md's literal eta,
``"strength"`` the relative step (the fraction of ``||h0||`` the first step moves h). The logit
form sees logits only, so it cannot use ``"strength"`` or ``"max_norm"`` (both need ``||h0||``;
such a config is refused when it is loaded): it takes ``"eta"``, ``DEFAULT_LOGIT_STEP`` if none
is given. The hidden form takes either (``SteerConfig()``'s ``"strength": 0.01`` if neither is
given). Either form is gated like ``SteerConfig()`` (``"margin": 0``) unless ``"margin": null``. A request's
``anchor_step_size`` replaces the config's step in the config's form: a literal eta for the logit
form (and for a hidden-form config with ``"eta"``), a relative strength for a hidden-form config
with ``"strength"``. The old ``"step_size"`` / ``"relative_step"`` keys are refused with the
migration.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

CONFIG_ENV = "ANCHOR_KERNELS_SERVING_CONFIG"
FORMS = ("logits", "hidden")
SET_KEY, STEP_KEY = "anchor_set", "anchor_step_size"
SET_STEP_KEY = "step"   # a set's own default step, in the config's form
# The literal step (SteerConfig eta) of the logit form. On SmolLM2-135M-Instruct the library's
# relative default (0.003 ||h0|| per step) is a literal eta of 0.003 ||h0|| / ||grad G(h0)||:
# median 0.064 (harmless), 0.097 (honest), 0.074 (positive_sentiment) over 20 chat prompts; 0.06
# is that strength, slightly on the mild side. Other models need their own value.
DEFAULT_LOGIT_STEP = 0.06
# The largest step a server accepts (a request's or the config's). While eta * reg <= 2 the K-space
# loop keeps ||c_T||_1 <= 2 eta T (|s|_1 <= 2 per step), so the logit change is at most
# 2 eta T max|W_v . W_a|: with eta <= 1e4 and T <= 1e4 that is finite for any head whose anchor
# products are below 1e29. Past eta * reg = 2 the loop diverges geometrically (|1 - eta reg| > 1).
MAX_STEP_SIZE = 1e4


class RequestSteering(NamedTuple):
    set_index: int
    step_size: float  # in the config's form: literal eta, or relative strength (step_meaning)


def step_meaning(config) -> str:
    """What a step is under ``config``, as messages and docs say it."""
    if config.relative_step:
        return "relative (SteerConfig strength: the fraction of ||h0|| the first step moves h)"
    return "literal (SteerConfig eta: METHOD.md's eta)"


def _config_from_dict(values: Mapping, form: str):
    from ..config import REMOVED_KEYWORDS, SteerConfig, migration_message

    if not isinstance(values, Mapping):
        raise TypeError(f"'config' must be an object of SteerConfig fields, got {type(values).__name__}")
    removed = {k: values[k] for k in REMOVED_KEYWORDS if k in values}
    if removed:
        raise ValueError(migration_message(removed, owner="'config'"))
    fields = set(SteerConfig.__dataclass_fields__)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"'config' has unknown fields {unknown}; SteerConfig has {sorted(fields)}")
    if form == "logits" and values.get("strength") is not None:
        raise ValueError("the logit form cannot use \"strength\" (the relative step: it needs ||h0||, which "
                         "logits do not carry): give \"eta\" (METHOD.md's literal step, default "
                         f"{DEFAULT_LOGIT_STEP}), or use \"form\": \"hidden\"")
    given = any(values.get(k) is not None for k in ("strength", "eta"))
    defaults = {} if form == "hidden" or given else {"eta": DEFAULT_LOGIT_STEP}
    config = SteerConfig(**{**values, **defaults})
    _check_step(f"'config' {'strength' if config.relative_step else 'eta'}", config.step_size, config)
    if form == "logits" and config.max_norm is not None:
        raise ValueError("the logit form cannot use max_norm (it needs ||h0||, which logits do not carry): "
                         "leave it out, or use \"form\": \"hidden\"")
    return config


def _check_step(name: str, step, config, meaning: str = "") -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not math.isfinite(step) \
            or not 0 <= step <= MAX_STEP_SIZE:
        raise ValueError(f"{name} must be a number in [0, {MAX_STEP_SIZE:g}] (larger steps can make logits "
                         f"non-finite), got {step!r}{meaning}")
    if not config.relative_step and step * config.reg > 2:
        raise ValueError(f"{name} = {step!r} times reg = {config.reg} exceeds 2: the K-space loop would "
                         f"diverge; use a step <= {2 / config.reg:g}{meaning}")


def _check_set_spec(name: str, spec) -> dict:
    if not isinstance(spec, Mapping):
        raise TypeError(f"set {name!r} must be an object, got {type(spec).__name__}")
    kinds = [k for k in (("lexicon",), ("positive", "negative"), ("positive_ids", "negative_ids"))
             if any(key in spec for key in k)]
    if len(kinds) != 1 or set(spec) - {SET_STEP_KEY} != set(kinds[0]):
        raise ValueError(f"set {name!r} must have exactly one of: 'lexicon'; 'positive' and 'negative' "
                         f"(words); 'positive_ids' and 'negative_ids'; and optionally {SET_STEP_KEY!r}; "
                         f"got keys {sorted(spec)}")
    if "lexicon" in spec:
        from .. import lexicons

        if not isinstance(spec["lexicon"], str) or spec["lexicon"] not in lexicons.names():
            raise ValueError(f"set {name!r}: unknown lexicon {spec['lexicon']!r}; shipped: {lexicons.names()}")
    for key in kinds[0]:
        if key == "lexicon":
            continue
        values, want = spec[key], (int if key.endswith("_ids") else str)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, want) and not isinstance(v, bool) for v in values):
            raise TypeError(f"set {name!r}: {key!r} must be a non-empty list of "
                            f"{'token ids (integers)' if want is int else 'words (strings)'}, got {values!r}")
    return dict(spec)


@dataclass(frozen=True)
class ServingConfig:
    """Named anchor sets, the SteerConfig they share, and the form (``"logits"``/``"hidden"``)."""

    sets: dict
    config: object  # SteerConfig
    form: str = "logits"
    model: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> "ServingConfig":
        if not isinstance(data, Mapping):
            raise TypeError(f"the serving config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"model", "form", "config", "sets"})
        if unknown:
            raise ValueError(f"the serving config has unknown keys {unknown}; expected model, form, config, sets")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not Path(model).is_dir()):
            raise ValueError(f"'model' must be a local checkpoint folder, got {model!r}")
        form = data.get("form", "logits")
        if form not in FORMS:
            raise ValueError(f"'form' must be one of {FORMS}, got {form!r}")
        sets = data.get("sets")
        if not isinstance(sets, Mapping) or not sets:
            raise ValueError("'sets' must be a non-empty object: set name -> set")
        checked = {}
        for name, spec in sets.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"set names must be non-empty strings, got {name!r}")
            checked[name] = _check_set_spec(name, spec)
        config = _config_from_dict(data.get("config", {}), form)
        for name, spec in checked.items():
            if SET_STEP_KEY in spec:
                _check_step(f"set {name!r} {SET_STEP_KEY!r}", spec[SET_STEP_KEY], config,
                            f"; this config's step is {step_meaning(config)}")
        return cls(checked, config, form, model)

    @classmethod
    def from_file(cls, path) -> "ServingConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
            raise ValueError(f"cannot read the serving config {path}: {type(e).__name__}: {str(e)[:200]}") from e
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def default(cls) -> "ServingConfig":
        from .. import lexicons

        return cls.from_dict({"sets": {name: {"lexicon": name} for name in lexicons.names()}})

    @classmethod
    def from_env(cls) -> "ServingConfig":
        """The server's config: ``$ANCHOR_KERNELS_SERVING_CONFIG``, else ``default()``. Read
        again when the file changes (processes of one server all see the same file)."""
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return _cached(None, 0.0)
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:
            raise ValueError(f"${CONFIG_ENV} names {path!r}, which cannot be read: {e}") from e
        return _cached(path, mtime)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.sets)

    def request(self, args) -> RequestSteering | None:
        """Parses a request's arguments (vLLM ``extra_args``, SGLang ``custom_params``): None if
        it asks for no steering; ValueError naming the argument if it asks wrongly."""
        if args is None:
            return None
        if not isinstance(args, Mapping):
            raise ValueError(f"request arguments must be an object, got {type(args).__name__}")
        unknown = sorted(k for k in args if isinstance(k, str) and k.startswith("anchor_")
                         and k not in (SET_KEY, STEP_KEY))
        if unknown:
            raise ValueError(f"unknown steering argument(s) {unknown}; expected {SET_KEY!r} and "
                             f"optionally {STEP_KEY!r}")
        if SET_KEY not in args:
            if STEP_KEY in args:
                raise ValueError(f"{STEP_KEY!r} needs {SET_KEY!r} (one of {list(self.names)})")
            return None
        name = args[SET_KEY]
        if not isinstance(name, str) or name not in self.sets:
            raise ValueError(f"{SET_KEY!r} = {name!r} is not a configured anchor set; "
                             f"configured: {list(self.names)}")
        step = args.get(STEP_KEY, self.set_step(name))
        _check_step(repr(STEP_KEY), step, self.config, f"; this server's step is {step_meaning(self.config)}")
        return RequestSteering(self.names.index(name), float(step))

    def set_step(self, name: str) -> float:
        """The step a request naming set ``name`` gets without ``anchor_step_size``: the set's
        ``"step"``, else the config's (both in the config's form)."""
        return float(self.sets[name].get(SET_STEP_KEY, self.config.step_size))

    def bank(self, tokenizer, vocab: int | None = None):
        """The configured sets as one AnchorBank (set i = ``names[i]``), words resolved with
        ``tokenizer``: a tokenizer, or a folder to load one from (only if a set has words). With
        ``vocab`` (the model's V), a token id outside it is refused, naming its set."""
        from ..anchors import AnchorBank, AnchorSet

        if isinstance(tokenizer, (str, Path)) and any("positive_ids" not in s for s in self.sets.values()):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        sets = []
        for name, spec in self.sets.items():
            try:
                if "lexicon" in spec:
                    sets.append(AnchorSet.from_lexicon(tokenizer, spec["lexicon"]))
                elif "positive" in spec:
                    sets.append(AnchorSet.from_words(tokenizer, spec["positive"], spec["negative"]))
                else:
                    sets.append(AnchorSet(spec["positive_ids"], spec["negative_ids"]))
                outside = sorted(t for t in sets[-1].ids if vocab is not None and t >= vocab)
                if outside:
                    raise ValueError(f"token ids {outside} are outside the model's vocabulary [0, {vocab})")
            except (TypeError, ValueError) as e:
                raise ValueError(f"anchor set {name!r}: {e}") from e
        return AnchorBank(sets)


_CACHE: dict = {}


def _cached(path, mtime) -> ServingConfig:
    key = (path, mtime)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ServingConfig.default() if path is None else ServingConfig.from_file(path)
    return _CACHE[key]


def read_lm_head(model_dir):
    """The ``[V, d]`` LM-head weight of a safetensors checkpoint folder, in its stored dtype (no
    fp32 copy): ``lm_head.weight``, or the input embedding of a model with tied embeddings.
    Whatever fails (a missing key in the index, a corrupt header) is a ValueError naming the folder."""
    model_dir = Path(model_dir)
    try:
        return _read_lm_head(model_dir)
    except Exception as e:  # SafetensorError, KeyError, JSONDecodeError, ... from a broken checkpoint
        why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot read the LM head from {model_dir}: {why}") from e


def _weight_map(model_dir: Path) -> dict:
    """Tensor name -> the safetensors file of the checkpoint folder that holds it."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors checkpoint to read the LM head from")
    where = {}
    for f in files:
        with safe_open(f, "pt") as st:
            where.update(dict.fromkeys(st.keys(), f.name))
    return where


def _read_lm_head(model_dir: Path):
    from safetensors import safe_open

    where = _weight_map(model_dir)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight",
                 "transformer.wte.weight"):
        if name in where:
            with safe_open(model_dir / where[name], "pt") as st:
                return st.get_tensor(name)
    raise ValueError(f"{model_dir}: no LM head (lm_head.weight) or tied input embedding found")


def has_lm_head_bias(model_dir) -> bool:
    """Whether a safetensors checkpoint folder stores an LM-head bias (``...lm_head.bias``)."""
    try:
        return any(name.endswith("lm_head.bias") for name in _weight_map(Path(model_dir)))
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint's tensor names in {model_dir}: {e}") from e
