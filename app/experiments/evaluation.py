"""From per-user metrics to tested comparisons: which test each metric gets, CUPED, SRM and
the multiplicity correction across the experiment's tests.

    result = evaluate(users, experiment, alpha=0.05, correction="holm")
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

import numpy as np

from app.experiments.definitions import Experiment
from app.experiments.metrics import HIGHER_IS_BETTER, UserMetrics
from app.experiments.stats import CORRECTIONS, Comparison, SampleRatio, cuped, cuped_theta, ratio_delta, srm_chi_square, two_proportion_z, welch_t

RATIO_METRICS = {"ctr": ("clicks", "impressions"), "like_rate": ("likes", "plays"), "skip_rate": ("skips", "plays"), "intra_list_diversity": ("ild_sum", "recs")}
MEAN_METRICS = {"listening_ms_per_user": ("listen_ms", "pre_listen_ms"), "sessions_per_user": ("sessions", "pre_sessions")}
PROPORTION_METRICS = {"users_clicking": "clicked"}


@dataclass
class MetricResult:
    metric: str
    variant: str
    higher_is_better: bool
    comparison: Comparison | None
    control_value: float
    treatment_value: float
    cuped_variance_reduction: float | None = None
    note: str = ""
    collapsed: bool = False
    """Untestable because the treatment has none of the metric's denominator (no plays for a
    skip rate) while the control has some: the treatment stopped producing what the metric
    is a rate of, which a guardrail on it counts as a breach rather than as nothing known."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["comparison"] = asdict(self.comparison) if self.comparison else None
        return d


@dataclass
class Evaluation:
    experiment: str
    alpha: float
    correction: str
    users: dict[str, int]
    srm: SampleRatio
    results: list[MetricResult]
    conflicting_users: int = 0
    notes: list[str] = field(default_factory=list)
    srm_threshold: float = 0.001
    """The sample-ratio p-value below which the split is flagged (experiments.srm_p_value)."""
    srm_arms: list[str] = field(default_factory=list)
    """The arms the sample ratio was checked over: every arm but the killed ones."""
    killed: list[str] = field(default_factory=list)
    """Variants rolled back: reported up to their kill, never decided on again."""

    @property
    def srm_mismatch(self) -> bool:
        return self.srm.mismatch(self.srm_threshold)

    def srm_message(self) -> str:
        s = self.srm
        return f"sample ratio mismatch: users of {self.srm_arms} {s.observed} against expected {[round(e, 1) for e in s.expected]} (p={s.p_value:.2g})"

    def get(self, variant: str, metric: str) -> MetricResult | None:
        return next((r for r in self.results if r.variant == variant and r.metric == metric), None)


def _compare_mean(users: UserMetrics, control: str, variant: str, column: str, pre: str, alpha: float) -> tuple[Comparison, float | None]:
    y0, y1 = users.arm(control, column), users.arm(variant, column)
    if not users.has_pre_period:
        return welch_t(y0, y1, alpha), None
    x0, x1 = users.arm(control, pre), users.arm(variant, pre)
    x = np.concatenate([x0, x1])
    y = np.concatenate([y0, y1])
    if x.var() == 0:
        return welch_t(y0, y1, alpha), None
    theta = cuped_theta(y, x)
    adjusted = cuped(y, x, theta)
    a0, a1 = adjusted[: len(y0)], adjusted[len(y0) :]
    raw_var = y0.var(ddof=1) / len(y0) + y1.var(ddof=1) / len(y1)
    new_var = a0.var(ddof=1) / len(a0) + a1.var(ddof=1) / len(a1)
    return welch_t(a0, a1, alpha), float(1 - new_var / raw_var) if raw_var > 0 else None


def evaluate(
    users: UserMetrics, experiment: Experiment, alpha: float = 0.05, correction: str = "holm", srm_threshold: float = 0.001, killed: Collection[str] = ()
) -> Evaluation:
    """`killed`: the experiment's rolled-back variants. They get no new users after the kill
    while the others keep growing, so the sample ratio is checked over the other arms only."""
    control = experiment.control
    names = [v.name for v in experiment.variants]
    counts = {v: users.users(v) for v in names}
    live = [v for v in names if v not in killed]
    if len(live) >= 2:
        srm = srm_chi_square([counts[v] for v in live], [experiment.variant(v).weight for v in live])
    else:  # only the control left: no split to check
        srm = SampleRatio([counts[v] for v in live], [float(counts[v]) for v in live], 0.0, 1.0)
    results: list[MetricResult] = []
    notes: list[str] = []
    for variant in experiment.treatments:
        for metric in HIGHER_IS_BETTER:
            good = HIGHER_IS_BETTER[metric]
            comparison, reduction, note, collapsed = None, None, "", False
            try:
                if metric in RATIO_METRICS:
                    y, x = RATIO_METRICS[metric]
                    x0, x1 = users.arm(control, x), users.arm(variant, x)
                    if len(x1) >= 2 and x1.sum() == 0 and x0.sum() > 0:
                        collapsed = True
                        raise ValueError(f"{variant} has no {x} (control: {x0.sum():g})")
                    comparison = ratio_delta(users.arm(control, y), x0, users.arm(variant, y), x1, alpha)
                elif metric in MEAN_METRICS:
                    comparison, reduction = _compare_mean(users, control, variant, *MEAN_METRICS[metric], alpha)
                elif metric in PROPORTION_METRICS:
                    col = PROPORTION_METRICS[metric]
                    c0, c1 = users.arm(control, col), users.arm(variant, col)
                    comparison = two_proportion_z(int(c0.sum()), len(c0), int(c1.sum()), len(c1), alpha)
            except ValueError as exc:
                note = f"not tested: {exc}"
            if comparison is not None:
                c_val, t_val = comparison.control, comparison.treatment
                if metric in MEAN_METRICS:  # report the raw means; the test used CUPED
                    c_val = float(users.arm(control, MEAN_METRICS[metric][0]).mean())
                    t_val = float(users.arm(variant, MEAN_METRICS[metric][0]).mean())
            elif metric == "latency_p95_ms":
                c_val, t_val = users.latency_p95_ms[control], users.latency_p95_ms[variant]
                note = note or "descriptive (threshold guardrail only)"
            elif metric == "coverage":
                c_val, t_val = users.coverage[control], users.coverage[variant]
                note = note or "descriptive: share of the catalogue recommended at least once"
            else:
                c_val = t_val = math.nan
            results.append(MetricResult(metric, variant, good, comparison, c_val, t_val, reduction, note, collapsed))
    tested = [r for r in results if r.comparison is not None and not math.isnan(r.comparison.p_value)]
    if tested:
        adjusted = CORRECTIONS[correction]([r.comparison.p_value for r in tested])
        for r, p in zip(tested, adjusted):
            r.comparison = r.comparison.with_adjusted(p)
    if users.conflicting_users:
        notes.append(f"{users.conflicting_users} users were exposed to more than one variant and are excluded")
    dead = [v for v in experiment.treatments if v in killed]
    if dead:
        notes.append(f"rolled back: {', '.join(dead)}; counted up to the kill, left out of the sample-ratio check and not decided on")
    result = Evaluation(experiment.name, alpha, correction, counts, srm, results, users.conflicting_users, notes, srm_threshold, live, dead)
    if result.srm_mismatch:
        notes.append(result.srm_message())
    return result
