"""Hugging Face transformers integration.

    with ak.hf.steer(model, anchors, config):
        model.generate(...)

Every position the LM head is given is edited, so every logit the model emits inside the
block is a steered one: at prefill generate hands the head only the last position
(``logits_to_keep``), at decode the new token, and under assisted or prompt-lookup decoding
every candidate position being verified, so those match steered greedy decoding. A model
called directly on a whole sequence gets all its positions steered.

``row_sets`` / ``step_size`` are given per request (the head input's first dimension); a
``step_size`` is in the config's form: relative for ``SteerConfig(strength=...)`` (the default),
METHOD.md's literal eta for ``SteerConfig(eta=...)``. When
generate expands the batch (``num_beams``, ``num_return_sequences``), it repeats each request
consecutively (``repeat_interleave``), so a batch of N = k * len(row_sets) rows gives row r the
entry of request r // k. The same rule applies to ``AnchorLogitsProcessor``.

Scope: the edit applies only to forwards run in the context (thread, asyncio task) that
entered the block; other threads using the same model concurrently are not steered. The
anchors are prepared for the LM-head weight on entry; modifying that weight in place inside
the block raises on the next forward instead of steering with a stale Gram.
"""
from __future__ import annotations

import contextvars

import torch

from ..anchors import prepare_anchors
from ..config import SteerConfig
from ..logits import LogitSteerer, needs_hidden_norm
from ..steer import steer_hidden

# The steer() blocks active in this context: the hooks only act for their own block.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("anchor_kernels_hf_steer",
                                                                   default=frozenset())


def _lm_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError("model must have an output embedding (LM head) with a [V, d] weight")
    return head


def expand_per_request(values, rows: int, name: str):
    """Per-request values -> per-row values for a batch that generate may have expanded."""
    if values is None:
        return None
    t = torch.as_tensor(values)
    if t.dim() != 1 or t.numel() == 0 or rows % t.numel():
        raise ValueError(f"{name} has {t.numel()} entries, which does not divide the batch of {rows} rows")
    return t.repeat_interleave(rows // t.numel())


class steer:
    """``with steer(model, anchors, config): ...`` steers the forwards of ``model``'s LM head run
    in this context inside the block; restores it on exit, even after an exception. Works with
    tied embeddings and an LM-head bias. Blocks may nest and exit in any order (each removes only
    itself); one object is one block: entering it again while it is entered raises."""

    def __init__(self, model, anchors, config: SteerConfig | None = None, *, row_sets=None, step_size=None,
                 backend: str = "auto"):
        self.head = _lm_head(model)
        self.config = SteerConfig() if config is None else config
        if not isinstance(self.config, SteerConfig):
            raise TypeError(f"config must be a SteerConfig, got {type(self.config).__name__}")
        self.model, self.anchors = model, anchors
        self.row_sets, self.step_size, self.backend = row_sets, step_size, backend
        self._handle = None

    def __enter__(self):
        if self._handle is not None:
            raise RuntimeError("this ak.hf.steer block is already entered: each `with` needs its own "
                               "ak.hf.steer(...) object")
        prepared = prepare_anchors(self.head.weight, self.anchors)  # the weight as it is on entry

        def edit_positions(module, args, kwargs):
            if self not in _ACTIVE.get():
                return None
            hidden = args[0] if args else kwargs["input"]
            if hidden.dim() < 2:
                raise ValueError(f"the LM-head input must be [batch, ..., d], got {tuple(hidden.shape)}")
            batch = hidden.shape[0]
            per_request = hidden[0].numel() // hidden.shape[-1]  # positions per batch row

            def per_row(values, name):
                values = expand_per_request(values, batch, name)
                return None if values is None else values.repeat_interleave(per_request)

            new = steer_hidden(hidden, module.weight, prepared, self.config, bias=getattr(module, "bias", None),
                               backend=self.backend, row_sets=per_row(self.row_sets, "row_sets"),
                               step_size=per_row(self.step_size, "step_size"))
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input": new}

        self._handle = self.head.register_forward_pre_hook(edit_positions, with_kwargs=True)
        _ACTIVE.set(_ACTIVE.get() | {self})
        return self.model

    def __exit__(self, *exc) -> None:
        # Remove this block only: resetting to the value before entry would also end a block
        # entered later and still open (enter A, enter B, exit A).
        _ACTIVE.set(_ACTIVE.get() - {self})
        self._handle.remove()
        self._handle = None


def logit_steerer(model, anchors, config: SteerConfig | None = None, with_hidden_norm: bool = False) -> LogitSteerer:
    head = _lm_head(model)
    return LogitSteerer(head.weight, anchors, config, bias=getattr(head, "bias", None),
                        with_hidden_norm=with_hidden_norm)


try:
    from transformers import LogitsProcessor
except ImportError:  # transformers is optional; only this class needs it
    LogitsProcessor = object


# |logsumexp| of a row below this: the row holds log-probabilities (fp32 rounding over a
# vocabulary stays far below it; raw logits hit it only by coincidence, where renormalising is
# harmless anyway).
LOG_PROB_TOLERANCE = 1e-3


class AnchorLogitsProcessor(LogitsProcessor):
    """The logit-space form as an HF ``LogitsProcessor``. Put it first in the list: it needs raw
    logits, or the log-probabilities beam search hands processors (returned re-normalised, as
    the hook form's are). ``row_sets`` / ``step_size`` are per request (see the module docstring)."""

    def __init__(self, steerer: LogitSteerer, row_sets=None, step_size=None):
        if not isinstance(steerer, LogitSteerer):
            raise TypeError(f"steerer must be a LogitSteerer (build one with "
                            f"ak.hf.logit_steerer(model, anchors, config)), got {type(steerer).__name__}")
        if steerer.with_hidden_norm:  # generate() hands a processor scores only: it would fail at the first token
            raise ValueError(f"AnchorLogitsProcessor cannot give the steerer hidden_norm, which its "
                             f"{needs_hidden_norm(steerer.config) or 'with_hidden_norm=True'} needs: use "
                             "SteerConfig(eta=..., max_norm=None) (METHOD.md's literal step), or ak.hf.steer "
                             "(the hidden state)")
        self.steerer, self.row_sets, self.step_size = steerer, row_sets, step_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        out = self.steerer(scores, row_sets=expand_per_request(self.row_sets, rows, "row_sets"),
                           step_size=expand_per_request(self.step_size, rows, "step_size"))
        # Beam search hands processors log-softmaxed scores and adds them to each beam's running
        # sum: re-normalised rows are what the hook form gives (log_softmax(W h' + b)). The edit
        # itself is shift-invariant, and so is every softmax-based decision made on the result.
        normalised = torch.logsumexp(scores.float(), dim=-1).abs() < LOG_PROB_TOLERANCE
        return torch.where(normalised[..., None], out.float().log_softmax(-1).to(out.dtype), out)
