"""SteerConfig: the hyper-parameters of METHOD.md, validated once."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

OBJECTIVES = ("mean", "lse")
# The kernels compute in fp32: every value must be finite there, and the loop must end.
FP32_MAX = 3.4028234663852886e38
MAX_STEPS = 10_000
# Below this the lse weights are a hard max in fp32 (z / tau overflows for |z| > 3e32 tau, and
# the fp64 answer itself moves by percents under 1e-7 relative input changes near 1e-7).
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e6
# The default step: relative, the fraction of ||h0|| the first step moves h (see SteerConfig).
DEFAULT_STRENGTH = 0.01
# Keywords of the old API (one ``step_size`` read as relative or literal by ``relative_step``):
# refused with the migration, never reinterpreted.
REMOVED_KEYWORDS = ("step_size", "relative_step")


def migration_message(removed, owner: str = "SteerConfig") -> str:
    """Why ``step_size=`` / ``relative_step=`` are refused and what to write instead, for the
    old keywords in ``removed`` (a mapping)."""
    old = ", ".join(f"{k}={removed[k]!r}" for k in REMOVED_KEYWORDS if k in removed)
    literal = "relative_step" in removed and not removed["relative_step"]
    step = repr(removed["step_size"]) if "step_size" in removed else "<your step>"
    here = f"eta={step}" if literal else f"strength={step}"
    return (f"{owner}({old}): step_size was ambiguous and is removed (with relative_step): write "
            f"strength= for the relative step (the fraction of ||h0|| the first step moves h, what "
            f"step_size meant with the default relative_step=True; the default is strength={DEFAULT_STRENGTH}) "
            f"or eta= for METHOD.md's literal step (what step_size meant with relative_step=False, "
            f"e.g. eta=0.5). Here: {here}")


@dataclass(frozen=True, init=False, repr=False)
class SteerConfig:
    """Hyper-parameters of the edit ``h_{k+1} = h_k + eta m_k (grad G(h_k) - lambda (h_k - h0))``.

    The step is given in exactly one of two forms, by name (METHOD.md, "The relative step": the
    two must never be confusable):
      strength=0.01   the relative step (the default form): the fraction of ||h0|| the first step
                      moves h, whatever the model's scale. Per row the kernels use the literal
                      eta_row = strength * ||h0|| / ||grad G(h0)||, computed in K-space
                      (||grad G||^2 = s^T Gm s). With the default margin the loop stops as soon as
                      a row's gap reaches 0, so the strength sets how fast a hostile row is
                      turned, not how far every row moves (docs/evaluation.md: without the margin
                      0.01 derails SmolLM2's neutral answers, with it they stay within the noise
                      of unsteered). The logit-space form needs ``hidden_norm`` for it.
      eta=None        METHOD.md's literal eta instead (then ``strength`` is None). A fixed literal
                      eta means different strengths on different models: SmolLM2-135M has
                      ||h0|| ~ 55 and anchor rows ~ 2.9, so eta = 0.5 edits h by ~18% per step
                      and its answers collapse into "love love ..."; on the 4M fortune model
                      eta = 0.5 was mild.
    Give one of ``strength=`` and ``eta=``, never both (ValueError); with neither, strength=0.01.
    The old ``step_size=`` / ``relative_step=`` keywords are refused (TypeError, with the
    migration): ``step_size=x`` (relative_step=True, the old default) is ``strength=x``;
    ``step_size=x, relative_step=False`` is ``eta=x``. All arguments are keywords. The kernels'
    callers read the derived, read-only ``step_size`` (the number, strength or eta) and
    ``relative_step`` (which form); neither is a constructor argument.

    The other defaults, and why:
      steps=10        T. Each step is a K x K mat-vec in the kernels, so T costs almost nothing;
                      10 lets the lse objective's softmax weights settle on the anchors that move.
      objective="lse" ``log p(P) - log p(N)`` at tau=1: the gap in probability space, which
                      saturates once negatives are suppressed; "mean" grows without bound.
      reg=0.0         lambda. Off: the trust region (max_norm) is the clearer bound on the edit.
      temperature=1.0 tau. 1 makes lse exactly the log-probability ratio. Allowed range
                      [1e-4, 1e6]: as tau -> 0 the softmax weights become a hard max and the
                      edit is ill-conditioned (the fp64 answer moves by percents under 1e-7
                      relative input changes near tau = 1e-7), so no fp32 kernel can track it.
      margin=0.0      a row is edited only while its gap G(h) is below 0: with lse, only where the
                      negative anchors outweigh the positive ones (log p(N) > log p(P)), and only
                      until they no longer do. This is what keeps the default from doing harm
                      (issue 21, docs/evaluation.md): ungated steering moves every position (KL to
                      the unsteered next-token distribution ~0.1 on neutral answers, top token
                      changed at ~14% of positions), drifts neutral answers off topic and loops
                      raw continuations; gated, neutral answers stay within the noise (KL ~0.006)
                      while hostile answers turn. ``margin=None`` (+inf) edits every row at every
                      step, METHOD.md's plain form.
      max_norm=None   rho: no trust region. ``||h' - h0|| <= rho ||h0||`` when set.
    """

    steps: int = 10
    strength: float | None = DEFAULT_STRENGTH
    eta: float | None = None
    objective: str = "lse"
    reg: float = 0.0
    temperature: float = 1.0
    margin: float | None = 0.0
    max_norm: float | None = None

    def __init__(self, *, steps: int = 10, strength: float | None = None, eta: float | None = None,
                 objective: str = "lse", reg: float = 0.0, temperature: float = 1.0,
                 margin: float | None = 0.0, max_norm: float | None = None, **removed):
        if removed:
            if any(k in removed for k in REMOVED_KEYWORDS):
                raise TypeError(migration_message(removed))
            raise TypeError(f"SteerConfig got unexpected keyword argument(s) {sorted(removed)}; "
                            f"its fields: {[f.name for f in fields(SteerConfig)]}")
        if strength is not None and eta is not None:
            raise ValueError(
                f"SteerConfig takes strength= (the relative step) or eta= (METHOD.md's literal step), "
                f"not both; got strength={strength!r} and eta={eta!r} (dataclasses.replace keeps the "
                "config's own: pass strength=None with eta=, or eta=None with strength=)")
        if strength is None and eta is None:
            strength = DEFAULT_STRENGTH
        for name, value in (("steps", steps), ("strength", strength), ("eta", eta), ("objective", objective),
                            ("reg", reg), ("temperature", temperature), ("margin", margin),
                            ("max_norm", max_norm)):
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {self.steps!r}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [0, {MAX_STEPS}], got {self.steps}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.eta is None:
            _check_float("strength", self.strength, minimum=0.0)
        else:
            _check_float("eta", self.eta, minimum=0.0)
        _check_float("reg", self.reg, minimum=0.0)
        _check_float("temperature", self.temperature, minimum=MIN_TEMPERATURE)
        if self.temperature > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be <= {MAX_TEMPERATURE:g}, got {self.temperature}")
        if self.margin is not None:
            _check_float("margin", self.margin)
        if self.max_norm is not None:
            _check_float("max_norm", self.max_norm, minimum=0.0)

    def __repr__(self) -> str:
        skip = "eta" if self.eta is None else "strength"
        return "SteerConfig(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                                          if f.name != skip) + ")"

    @property
    def step_size(self) -> float:
        """Derived, read-only (not a constructor argument): the number the kernels take as their
        step, ``strength`` or ``eta``, whichever is set; ``relative_step`` says which it is."""
        return self.strength if self.eta is None else self.eta

    @property
    def relative_step(self) -> bool:
        """Derived, read-only (not a constructor argument): True for ``strength=`` (the relative
        step), False for ``eta=`` (METHOD.md's literal step)."""
        return self.eta is None

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
