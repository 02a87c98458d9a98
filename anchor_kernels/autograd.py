"""Gradients of the steering ops: the edit is differentiable, so its backward is registered
for every kernel op (C++ and Triton), never a silent zero.

The backward recomputes the edit from the saved inputs in eager K-space form
(``kspace.steer_rows_differentiable``, fp32) and lets autograd differentiate it: exact for the
method (the K-space form is an identity, not an approximation), cheap next to any training
step, and never on the decoding path (inference runs without grad).
"""
from __future__ import annotations

import math

import torch

from .config import SteerConfig
from .kspace import steer_rows_differentiable

DIFFERENTIABLE = 3  # hidden, weight, bias: the leading arguments of the schema
NUM_ARGS = 15


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, anchor_ids, anchor_weights, _gram, row_sets, step_size, steps,
     objective, reg, temperature, margin, max_norm, relative_step) = inputs
    ctx.save_for_backward(hidden, weight, bias, anchor_ids, anchor_weights, row_sets, step_size)
    ctx.config = SteerConfig(steps=steps, step_size=0.0, objective=objective, reg=reg,
                             temperature=temperature,
                             margin=None if math.isinf(margin) and margin > 0 else margin,
                             max_norm=None if math.isinf(max_norm) else max_norm,
                             relative_step=relative_step)


def _backward(ctx, grad_out):
    hidden, weight, bias, anchor_ids, anchor_weights, row_sets, step_size = ctx.saved_tensors
    needs = ctx.needs_input_grad[:DIFFERENTIABLE]
    leaves = [None if t is None else t.detach().requires_grad_(need)
              for t, need in zip((hidden, weight, bias), needs)]
    with torch.enable_grad():
        out = steer_rows_differentiable(leaves[0], leaves[1], leaves[2], anchor_ids, anchor_weights,
                                        row_sets, step_size, ctx.config)
        wanted = [t for t, need in zip(leaves, needs) if need and t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.float(), allow_unused=True)
                     if wanted else ())
    result = []
    for t, need in zip(leaves, needs):
        g = next(grads) if need and t is not None else None
        result.append(None if g is None else g.to(t.dtype))
    return (*result, *([None] * (NUM_ARGS - DIFFERENTIABLE)))


def register(op_name: str) -> None:
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)
