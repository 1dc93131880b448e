"""Guardrails and the decision: ship, keep running, or roll back, in words with the numbers.

- A critical breach rolls the variant back (the evaluator then sets its kill switch).
- Ship needs the primary metric significantly better after the multiplicity correction, no
  warning or critical breach, a clean sample ratio, and every degradation guardrail's
  interval inside its tolerance (non-inferiority shown, not merely harm not shown).
- Anything else keeps running, saying what is missing.
- A variant rolled back before gets no decision: its data stop at the kill.

    decisions = decide(evaluation, experiment)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from app.experiments.definitions import Experiment, Guardrail
from app.experiments.evaluation import Evaluation, MetricResult
from app.experiments.stats import minimum_detectable_effect

SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}


@dataclass
class Breach:
    variant: str
    metric: str
    kind: str
    severity: str
    message: str


@dataclass
class Decision:
    variant: str
    action: str
    """ship, keep running, or roll back."""
    recommendation: str
    breaches: list[Breach] = field(default_factory=list)

    @property
    def rollback(self) -> bool:
        return self.action == "roll back"

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.2%}"


def _rel_ci(r: MetricResult) -> tuple[float, float]:
    """The relative lift's interval: the log-ratio one, or where that does not exist (an arm's
    mean is 0, as when a treatment breaks completely) the absolute interval over the control's
    value, so that a collapse to zero reads as about -100% rather than as nothing known."""
    c = r.comparison
    lo, hi = c.rel_ci
    if (math.isnan(lo) or math.isnan(hi)) and c.control:
        return c.abs_ci[0] / abs(c.control), c.abs_ci[1] / abs(c.control)
    return lo, hi


def _interval(r: MetricResult) -> str:
    lo, hi = _rel_ci(r)
    return f"{_pct(r.comparison.rel_lift)} [{_pct(lo)}, {_pct(hi)}]"


def check(guardrail: Guardrail, r: MetricResult | None, alpha: float) -> tuple[Breach | None, bool]:
    """(breach or None, whether the guardrail is shown safe). Shown safe is what ship needs:
    for a degradation guardrail, the interval's harmful end within the tolerance."""
    if r is None:
        return None, False
    name, sev = guardrail.metric, guardrail.severity
    if r.collapsed:
        why = r.note.removeprefix("not tested: ")
        return Breach(r.variant, name, guardrail.kind, sev, f"{name} cannot be measured any more: {why}"), False
    if guardrail.kind == "threshold":
        value = r.treatment_value
        if value is None or math.isnan(value):
            return None, False
        if guardrail.max is not None and value > guardrail.max:
            return Breach(r.variant, name, "threshold", sev, f"{name} is {value:g}, above the limit {guardrail.max:g}"), False
        if guardrail.min is not None and value < guardrail.min:
            return Breach(r.variant, name, "threshold", sev, f"{name} is {value:g}, below the limit {guardrail.min:g}"), False
        return None, True
    c = r.comparison
    if c is None:
        return None, False
    if guardrail.kind == "degradation":
        (lo, hi), limit = _rel_ci(r), guardrail.tolerance
        if math.isnan(lo) or math.isnan(hi):  # no relative scale (control 0): tolerance x 0 in the metric's units
            (lo, hi), limit = c.abs_ci, guardrail.tolerance * abs(c.control)
        if math.isnan(lo) or math.isnan(hi):
            return None, False
        # Harm in the metric's bad direction, expressed so that larger is worse.
        worst, best = (-lo, -hi) if r.higher_is_better else (hi, lo)
        if best > limit:
            return Breach(r.variant, name, "degradation", sev, f"{name} worse by more than {guardrail.tolerance:.0%} with confidence: lift {_interval(r)}"), False
        return None, worst <= limit
    p = c.p_adjusted if c.p_adjusted is not None else c.p_value
    if math.isnan(p):
        return None, False
    harmful = (c.abs_lift < 0) == r.higher_is_better and c.abs_lift != 0
    if harmful and p < alpha:
        return Breach(r.variant, name, "statistical", sev, f"{name} significantly worse: lift {_interval(r)}, adjusted p={p:.3g}"), False
    return None, True


def decide(evaluation: Evaluation, experiment: Experiment, power: float = 0.8) -> list[Decision]:
    out = []
    alpha = evaluation.alpha
    for variant in experiment.treatments:
        if variant in evaluation.killed:  # rolled back already: nothing left to decide
            continue
        breaches, unsafe = [], []
        for g in experiment.guardrails:
            breach, safe = check(g, evaluation.get(variant, g.metric), alpha)
            if breach:
                breaches.append(breach)
            elif not safe and g.kind == "degradation":
                unsafe.append(g.metric)
        if evaluation.srm_mismatch:
            breaches.append(Breach(variant, "users", "srm", "warning", evaluation.srm_message()))
        worst = max((SEVERITY_ORDER[b.severity] for b in breaches), default=-1)
        primary = evaluation.get(variant, experiment.primary_metric)
        n = f"{evaluation.users.get(experiment.control, 0)} control / {evaluation.users.get(variant, 0)} {variant} users"
        reasons = "; ".join(b.message for b in breaches)
        if worst == SEVERITY_ORDER["critical"]:
            out.append(Decision(variant, "roll back", f"Roll back {variant}: {reasons} ({n}).", breaches))
            continue
        c = primary.comparison if primary else None
        if c is None:
            out.append(Decision(variant, "keep running", f"Keep running: the primary metric {experiment.primary_metric} could not be tested yet ({n}).", breaches))
            continue
        p = c.p_adjusted if c.p_adjusted is not None else c.p_value
        better = (c.abs_lift > 0) == primary.higher_is_better and c.abs_lift != 0
        summary = f"{experiment.primary_metric} {c.control:.4g} -> {c.treatment:.4g}, lift {_interval(primary)}, adjusted p={p:.3g}"
        if better and p < alpha and worst < SEVERITY_ORDER["warning"] and not unsafe:
            out.append(Decision(variant, "ship", f"Ship {variant}: {summary}; no guardrail breached ({n}).", breaches))
            continue
        why = []
        if worst >= SEVERITY_ORDER["warning"]:
            why.append(f"warnings: {reasons}")
        if unsafe:
            why.append(f"cannot yet rule out degradation beyond tolerance in {', '.join(unsafe)}")
        if not (better and p < alpha):
            mde = minimum_detectable_effect(c.se, power, alpha)
            rel = mde / abs(c.control) if c.control else math.nan
            why.append(f"the primary metric is not significantly better (detectable now with {power:.0%} power: {_pct(rel).lstrip('+')} relative)")
        out.append(Decision(variant, "keep running", f"Keep running {variant}: {summary}; " + "; ".join(why) + f" ({n}).", breaches))
    return out
