"""Hugging Face transformers integration.

    with ak.hf.steer(model, anchors, config):
        model.generate(...)

The LM-head input is edited at its last position on every forward: the prompt's last token at
prefill and every decoded token after it. ``row_sets`` / ``step_size`` are given per request.
When generate expands the batch (``num_beams``, ``num_return_sequences``), it repeats each request
consecutively (``repeat_interleave``), so a batch of N = k * len(row_sets) rows gives row r the
entry of request r // k. The same rule applies to ``AnchorLogitsProcessor``.
"""
from __future__ import annotations

import contextlib

import torch

from .config import SteerConfig
from .logits import LogitSteerer
from .steer import steer_hidden


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


@contextlib.contextmanager
def steer(model, anchors, config: SteerConfig | None = None, *, row_sets=None, step_size=None,
          backend: str = "auto"):
    """Steers every forward of ``model``'s LM head inside the block; restores it on exit, even
    after an exception. Works with tied embeddings and an LM-head bias."""
    head = _lm_head(model)

    def edit_last_position(module, args, kwargs):
        hidden = args[0] if args else kwargs["input"]
        if hidden.dim() < 2:
            raise ValueError(f"the LM-head input must be [..., L, d], got {tuple(hidden.shape)}")
        last = hidden[..., -1, :]
        rows = last.reshape(-1, last.shape[-1]).shape[0]
        steered = steer_hidden(last, module.weight, anchors, config,
                               bias=getattr(module, "bias", None), backend=backend,
                               row_sets=expand_per_request(row_sets, rows, "row_sets"),
                               step_size=expand_per_request(step_size, rows, "step_size"))
        new = (steered.unsqueeze(-2) if hidden.shape[-2] == 1  # decode: no copy of the rest
               else torch.cat([hidden[..., :-1, :], steered.unsqueeze(-2)], dim=-2))
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "input": new}

    handle = head.register_forward_pre_hook(edit_last_position, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def logit_steerer(model, anchors, config: SteerConfig | None = None) -> LogitSteerer:
    head = _lm_head(model)
    return LogitSteerer(head.weight, anchors, config, bias=getattr(head, "bias", None))


try:
    from transformers import LogitsProcessor
except ImportError:  # transformers is optional; only this class needs it
    LogitsProcessor = object


class AnchorLogitsProcessor(LogitsProcessor):
    """The logit-space form as an HF ``LogitsProcessor``. Put it first in the list: it needs raw
    logits. ``row_sets`` / ``step_size`` are per request (see the module docstring)."""

    def __init__(self, steerer: LogitSteerer, row_sets=None, step_size=None):
        self.steerer, self.row_sets, self.step_size = steerer, row_sets, step_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        return self.steerer(scores, row_sets=expand_per_request(self.row_sets, rows, "row_sets"),
                            step_size=expand_per_request(self.step_size, rows, "step_size"))
