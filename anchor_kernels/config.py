"""SteerConfig: the hyper-parameters of METHOD.md, validated once."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

OBJECTIVES = ("mean", "lse")
# The kernels compute in fp32: every value must be finite there, and the loop must end.
FP32_MAX = 3.4028234663852886e38
MAX_STEPS = 10_000
# Below this the lse weights are a hard max in fp32 (z / tau overflows for |z| > 3e32 tau, and
# the fp64 answer itself moves by percents under 1e-7 relative input changes near 1e-7).
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e6


@dataclass(frozen=True)
class SteerConfig:
    """Hyper-parameters of the edit ``h_{k+1} = h_k + eta m_k (grad G(h_k) - lambda (h_k - h0))``.

    Defaults, and why:
      steps=10        T. Each step is a K x K mat-vec in the kernels, so T costs almost nothing;
                      10 lets the lse objective's softmax weights settle on the anchors that move.
      step_size=0.003 eta, relative (``relative_step=True``): the first step moves h by
                      eta * ||h0||, whatever the model's scale. The literal METHOD.md eta
                      (``relative_step=False``) is eta_row = step_size * ||h0|| / ||grad G(h0)||
                      here, computed in K-space (||grad G||^2 = s^T Gm s). A fixed literal eta
                      means different strengths on different models: SmolLM2-135M has
                      ||h0|| ~ 55 and anchor rows ~ 2.9, so eta = 0.5 edits h by ~18% per step
                      and its answers collapse into "love love ..."; on the 4M fortune model
                      eta = 0.5 was mild. Relative 0.003 (T = 10: about 3% of ||h0|| in all) gave
                      coherent, clearly more positive chat answers on SmolLM2 (README eval);
                      0.01 already degenerates into repetition there.
      relative_step=True  see step_size. The logit-space form needs ``hidden_norm`` for it.
      objective="lse" ``log p(P) - log p(N)`` at tau=1: the gap in probability space, which
                      saturates once negatives are suppressed; "mean" grows without bound.
      reg=0.0         lambda. Off: the trust region (max_norm) is the clearer bound on the edit.
      temperature=1.0 tau. 1 makes lse exactly the log-probability ratio. Allowed range
                      [1e-4, 1e6]: as tau -> 0 the softmax weights become a hard max and the
                      edit is ill-conditioned (the fp64 answer moves by percents under 1e-7
                      relative input changes near tau = 1e-7), so no fp32 kernel can track it.
      margin=None     +inf: every row is edited at every step. Set it to leave rows that already
                      show a gap >= margin alone.
      max_norm=None   rho: no trust region. ``||h' - h0|| <= rho ||h0||`` when set.
    """

    steps: int = 10
    step_size: float = 0.003
    objective: str = "lse"
    reg: float = 0.0
    temperature: float = 1.0
    margin: float | None = None
    max_norm: float | None = None
    relative_step: bool = True

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {self.steps!r}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [0, {MAX_STEPS}], got {self.steps}")
        if not isinstance(self.relative_step, bool):
            raise TypeError(f"relative_step must be a bool, got {self.relative_step!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check_float("step_size", self.step_size, minimum=0.0)
        _check_float("reg", self.reg, minimum=0.0)
        _check_float("temperature", self.temperature, minimum=MIN_TEMPERATURE)
        if self.temperature > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be <= {MAX_TEMPERATURE:g}, got {self.temperature}")
        if self.margin is not None:
            _check_float("margin", self.margin)
        if self.max_norm is not None:
            _check_float("max_norm", self.max_norm, minimum=0.0)

    @property
    def margin_value(self) -> float:
        return math.inf if self.margin is None else float(self.margin)

    @property
    def max_norm_value(self) -> float:
        return math.inf if self.max_norm is None else float(self.max_norm)


def _check_float(name: str, value, minimum: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or abs(value) > FP32_MAX:
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FP32_MAX:.4g}), got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
