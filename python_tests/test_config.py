"""SteerConfig's two step forms (METHOD.md, "The relative step"): ``strength=`` (relative, the
default) and ``eta=`` (METHOD.md's literal eta) are distinct names that cannot be confused, and
the old ambiguous ``step_size=`` / ``relative_step=`` keywords are refused with the migration."""
import copy
import dataclasses
import pickle

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import reference
from anchor_kernels.anchors import as_bank
from anchor_kernels.config import DEFAULT_STRENGTH, SteerConfig
from conftest import kernel_backends

A = ak.AnchorSet([1, 2, 5], [3, 4])


@pytest.mark.parametrize("old,here", [
    (dict(step_size=0.5), "Here: strength=0.5"),
    (dict(step_size=0.5, relative_step=True), "Here: strength=0.5"),
    (dict(step_size=0.5, relative_step=False), "Here: eta=0.5"),
    (dict(relative_step=False), "Here: eta=<your step>"),
    (dict(relative_step=True, steps=3), "Here: strength=<your step>"),
])
def test_the_old_keywords_are_refused_with_the_migration(old, here):
    with pytest.raises(TypeError) as info:
        SteerConfig(**old)
    message = str(info.value)
    assert "ambiguous and is removed" in message
    assert "strength= for the relative step" in message and "eta= for METHOD.md's literal step" in message
    assert "what step_size meant with the default relative_step=True" in message
    assert "what step_size meant with relative_step=False" in message
    assert message.endswith(here)


@pytest.mark.parametrize("old", [dict(step_size=0.1), dict(relative_step=False)])
def test_dataclasses_replace_with_an_old_keyword_is_refused(old):
    for config in (SteerConfig(), SteerConfig(eta=0.5, steps=3)):
        with pytest.raises(TypeError, match="ambiguous and is removed"):
            dataclasses.replace(config, **old)


def test_strength_and_eta_together_are_refused():
    with pytest.raises(ValueError, match=r"strength= \(the relative step\) or eta= .*not both; "
                                         r"got strength=0\.01 and eta=0\.5"):
        SteerConfig(strength=0.01, eta=0.5)
    # replace keeps the config's own form: switching needs the other set to None, which it says.
    with pytest.raises(ValueError, match="pass strength=None with eta="):
        dataclasses.replace(SteerConfig(), eta=0.5)
    literal = dataclasses.replace(SteerConfig(steps=4), strength=None, eta=0.5)
    assert literal == SteerConfig(steps=4, eta=0.5) and not literal.relative_step
    relative = dataclasses.replace(literal, eta=None, strength=0.02)
    assert relative == SteerConfig(steps=4, strength=0.02) and relative.relative_step
    assert dataclasses.replace(literal, eta=0.25).eta == 0.25


def test_the_default_is_strength_0_01_gated_at_margin_0():
    config = SteerConfig()
    assert DEFAULT_STRENGTH == 0.01
    assert config.strength == 0.01 and config.eta is None and config.margin == 0.0
    assert config.step_size == 0.01 and config.relative_step is True
    assert SteerConfig.strength == 0.01 and SteerConfig.eta is None   # class defaults (argparse)
    assert SteerConfig.margin == 0.0
    assert SteerConfig(strength=None, eta=None) == config == SteerConfig(strength=0.01)
    literal = SteerConfig(eta=0.5)
    assert literal.strength is None and literal.eta == 0.5
    assert literal.step_size == 0.5 and literal.relative_step is False


def test_step_size_and_relative_step_are_derived_and_read_only():
    config = SteerConfig(eta=0.5)
    for name in ("step_size", "relative_step", "strength", "eta"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, name, 1.0)
    assert [f.name for f in dataclasses.fields(SteerConfig)] == [
        "steps", "strength", "eta", "objective", "reg", "temperature", "margin", "max_norm"]
    for name in ("step_size", "relative_step"):
        assert "Derived, read-only" in getattr(SteerConfig, name).__doc__


def test_arguments_are_keywords_and_unknown_ones_are_named():
    with pytest.raises(TypeError, match="positional"):
        SteerConfig(10, 0.5)   # the old (steps, step_size) order must not become (steps, strength)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['stepsize'\]"):
        SteerConfig(stepsize=0.5)


def test_repr_shows_the_form_given():
    relative, literal = SteerConfig(steps=4), SteerConfig(eta=0.5, max_norm=0.1)
    assert repr(relative) == ("SteerConfig(steps=4, strength=0.01, objective='lse', reg=0.0, "
                              "temperature=1.0, margin=0.0, max_norm=None)")
    assert repr(literal) == ("SteerConfig(steps=10, eta=0.5, objective='lse', reg=0.0, "
                             "temperature=1.0, margin=0.0, max_norm=0.1)")
    for config in (relative, literal):
        assert "step_size" not in str(config) and "relative_step" not in str(config)
        assert eval(repr(config), {"SteerConfig": SteerConfig}) == config


def test_equality_hash_pickle_and_copy():
    assert SteerConfig(strength=0.5) != SteerConfig(eta=0.5)
    assert len({SteerConfig(strength=0.5): 1, SteerConfig(eta=0.5): 2, SteerConfig(strength=0.5): 3}) == 2
    for config in (SteerConfig(steps=3, margin=1.0), SteerConfig(eta=0.25, objective="mean")):
        same = dataclasses.replace(config)
        assert same == config and hash(same) == hash(config)
        assert pickle.loads(pickle.dumps(config)) == config
        assert copy.deepcopy(config) == config and copy.copy(config) == config


def _problem(rows=5, d=24, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * 3, torch.randn(vocab, d, generator=g) / d ** 0.5


def _reference(hidden, weight, config, eta=None):
    rows = hidden.shape[0]
    eta = torch.full((rows,), float(config.step_size)) if eta is None else eta
    return reference.steer_rows_fp64(hidden, weight, None, as_bank(A), torch.zeros(rows, dtype=torch.long),
                                     eta, config)


def _grad_gap(hidden, weight, config):
    """grad G(h0) per row, from full-vocabulary fp64 logits (independent of the library's loop)."""
    h = hidden.double().requires_grad_(True)
    logits = h @ weight.double().T
    gap = reference.anchor_gap(logits[:, list(A.positive)], logits[:, list(A.negative)], A, config)
    (grad,) = torch.autograd.grad(gap.sum(), h)
    return grad


@pytest.mark.parametrize("objective", ["lse", "mean"])
def test_strength_is_the_relative_step_and_eta_the_literal_one(objective):
    hidden, weight = _problem()
    h0 = hidden.double()
    strength, eta = 0.01, 0.5
    relative = SteerConfig(steps=1, strength=strength, objective=objective, margin=None)
    literal = SteerConfig(steps=1, eta=eta, objective=objective, margin=None)
    grad = _grad_gap(hidden, weight, relative)
    # eta: METHOD.md's literal step, h1 = h0 + eta grad G(h0).
    torch.testing.assert_close(_reference(hidden, weight, literal), h0 + eta * grad, rtol=1e-12, atol=1e-12)
    # strength: the first step moves h by strength * ||h0||, in the gradient's direction (the
    # step reaches the oracle as an fp32 per-row tensor: 0.01 to 3e-8 relative).
    moved = _reference(hidden, weight, relative) - h0
    torch.testing.assert_close(moved.norm(dim=-1), strength * h0.norm(dim=-1), rtol=1e-7, atol=0)
    row_eta = strength * h0.norm(dim=-1) / grad.norm(dim=-1)
    torch.testing.assert_close(moved, row_eta[:, None] * grad, rtol=1e-7, atol=1e-12)
    # The same number under the two names is a very different edit (the confusion METHOD.md forbids).
    ratio = (eta * grad).norm(dim=-1) / (eta * h0.norm(dim=-1))
    assert not torch.allclose(ratio, torch.ones_like(ratio), rtol=0.5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernels_read_the_form_from_the_config(backend):
    """steer_hidden with strength= equals the literal form with the per-row eta it implies, over
    several steps, and eta= is METHOD.md's loop: both against the fp64 oracle."""
    hidden, weight = _problem(rows=6, d=32)
    h0 = hidden.double()
    relative = SteerConfig(steps=5, strength=0.004, margin=None)
    literal = SteerConfig(steps=5, eta=0.3, margin=None)
    implied = (0.004 * h0.norm(dim=-1) / _grad_gap(hidden, weight, relative).norm(dim=-1)).float()
    got_relative = ak.steer_hidden(hidden, weight, A, relative, backend=backend)
    got_literal = ak.steer_hidden(hidden, weight, A, literal, backend=backend)
    torch.testing.assert_close(got_relative.double(), _reference(hidden, weight, relative), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_literal.double(), _reference(hidden, weight, literal), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_reference(hidden, weight, relative),
                               _reference(hidden, weight, SteerConfig(steps=5, eta=1.0, margin=None), eta=implied),
                               rtol=1e-6, atol=1e-6)
    # Per-row steps are in the config's form.
    per_row = ak.steer_hidden(hidden, weight, A, SteerConfig(steps=5, eta=1.0, margin=None), backend=backend,
                              step_size=implied)
    torch.testing.assert_close(per_row, got_relative, rtol=1e-4, atol=1e-5)
