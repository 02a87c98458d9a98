"""Gradients of the steering ops: the edit is differentiable, so its backward is registered
for every kernel op (C++ and Triton), never a silent zero.

The backward recomputes the edit from the saved inputs in eager K-space form
(``kspace.steer_rows_differentiable``, fp32) and differentiates it with ``torch.func.vjp``, so
it is itself differentiable (double backward works): exact for the method (the K-space form is an identity, not an approximation), cheap next to any training
step, and never on the decoding path (inference runs without grad).
"""
from __future__ import annotations

import math

import torch

from .config import SteerConfig
from .kspace import steer_rows_differentiable

DIFFERENTIABLE = 3  # hidden, weight, bias: the leading arguments of the schema
NUM_ARGS = 16


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, anchor_ids, anchor_weights, _gram, row_sets, step_size, steps,
     objective, reg, temperature, margin, max_norm, relative_step, *_direction) = inputs
    ctx.save_for_backward(hidden, weight, bias, anchor_ids, anchor_weights, row_sets, step_size)
    # The step itself is the saved per-row tensor; the config only says its form (0.0 is a placeholder).
    step = dict(strength=0.0) if relative_step else dict(eta=0.0)
    ctx.config = SteerConfig(steps=steps, objective=objective, reg=reg, temperature=temperature,
                             margin=None if math.isinf(margin) and margin > 0 else margin,
                             max_norm=None if math.isinf(max_norm) else max_norm, **step)


def _backward(ctx, grad_out):
    hidden, weight, bias, anchor_ids, anchor_weights, row_sets, step_size = ctx.saved_tensors
    needs = ctx.needs_input_grad[:DIFFERENTIABLE]
    inputs = [hidden, weight, bias]
    wanted = [i for i, t in enumerate(inputs) if needs[i] and t is not None]

    def edit(*primals):
        args = list(inputs)
        for i, t in zip(wanted, primals):
            args[i] = t
        return steer_rows_differentiable(*args, anchor_ids, anchor_weights, row_sets, step_size, ctx.config)

    # torch.func.vjp differentiates in the listed inputs only (no path through their history) and
    # its result stays on the outer graph under create_graph: double backward (a gradient
    # penalty) gets its second-order term instead of a detached first-order gradient.
    grads = iter(())
    if wanted:
        _, vjp = torch.func.vjp(edit, *(inputs[i] for i in wanted))
        grads = iter(vjp(grad_out.float()))
    result = [None] * DIFFERENTIABLE
    for i in wanted:
        result[i] = next(grads).to(inputs[i].dtype)
    return (*result, *([None] * (NUM_ARGS - DIFFERENTIABLE)))


def register(op_name: str) -> None:
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)
