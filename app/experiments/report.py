"""The experiment report: one JSON document and one self-contained HTML page with inline SVG
plots (no plotting dependency): relative lift with its interval per metric, and each variant's
daily CTR and listening time.

    doc = report_json(evaluation, decisions, users); html = report_html(doc)
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone

from app.experiments.evaluation import Evaluation
from app.experiments.guardrails import Decision
from app.experiments.metrics import DAY_MS, UserMetrics

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def _clean(x):
    """JSON has no NaN: missing numbers become null."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def report_json(evaluation: Evaluation, decisions: list[Decision], users: UserMetrics, extra: dict | None = None) -> dict:
    daily = users.daily.copy()
    daily["date"] = [datetime.fromtimestamp(int(d) * DAY_MS / 1000, tz=timezone.utc).date().isoformat() for d in daily["day"]]
    daily["ctr"] = daily["clicks"] / daily["impressions"].where(daily["impressions"] > 0)
    return _clean(
        {
            "experiment": evaluation.experiment,
            "alpha": evaluation.alpha,
            "correction": evaluation.correction,
            "users": evaluation.users,
            "conflicting_users": evaluation.conflicting_users,
            "srm": {"arms": evaluation.srm_arms, "observed": evaluation.srm.observed, "expected": evaluation.srm.expected, "chi2": evaluation.srm.chi2, "p_value": evaluation.srm.p_value},
            "cuped": users.has_pre_period,
            "decisions": [d.to_dict() for d in decisions],
            "metrics": [r.to_dict() for r in evaluation.results],
            "daily": daily.drop(columns=["day"]).to_dict("records"),
            "notes": evaluation.notes,
            **(extra or {}),
        }
    )


def _fmt(x, pct=False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2%}" if pct else f"{x:.4g}"


def lift_svg(metrics: list[dict], width: int = 640) -> str:
    """Forest plot: relative lift and its interval per tested metric, zero line marked."""
    rows = [m for m in metrics if m["comparison"] and m["comparison"]["rel_ci"][0] is not None]
    if not rows:
        return "<p>No tested metrics.</p>"
    lo = min(min(m["comparison"]["rel_ci"][0] for m in rows), 0)
    hi = max(max(m["comparison"]["rel_ci"][1] for m in rows), 0)
    pad = (hi - lo) * 0.1 or 0.01
    lo, hi = lo - pad, hi + pad
    left, plot_w, row_h = 230, width - 250, 26
    x = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(rows) + 40}" font-family="sans-serif" font-size="12">']
    parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="5" y2="{row_h * len(rows) + 10}" stroke="#999" stroke-dasharray="3,3"/>')
    for i, m in enumerate(rows):
        c = m["comparison"]
        y = 20 + i * row_h
        p = c["p_adjusted"] if c["p_adjusted"] is not None else c["p_value"]
        good = (c["abs_lift"] > 0) == m["higher_is_better"]
        colour = "#999" if p is None or p >= 0.05 else ("#2ca02c" if good else "#d62728")
        label = html.escape(f"{m['metric']} ({m['variant']})")
        parts.append(f'<text x="5" y="{y + 4}">{label}</text>')
        parts.append(f'<line x1="{x(c["rel_ci"][0]):.1f}" x2="{x(c["rel_ci"][1]):.1f}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<circle cx="{x(c["rel_lift"]):.1f}" cy="{y}" r="4" fill="{colour}"><title>{_fmt(c["rel_lift"], True)} [{_fmt(c["rel_ci"][0], True)}, {_fmt(c["rel_ci"][1], True)}]</title></circle>')
    axis_y = row_h * len(rows) + 30
    for v in (lo, 0.0, hi):
        parts.append(f'<text x="{x(v):.1f}" y="{axis_y}" text-anchor="middle">{v:+.1%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def series_svg(daily: list[dict], field: str, width: int = 640, height: int = 200) -> str:
    """One line per variant of a daily figure."""
    rows = [r for r in daily if r.get(field) is not None]
    if not rows:
        return f"<p>No daily {html.escape(field)}.</p>"
    dates = sorted({r["date"] for r in rows})
    variants = sorted({r["variant"] for r in rows})
    vals = [r[field] for r in rows]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    left, top, pw, ph = 60, 10, width - 160, height - 40
    x = lambda d: left + (dates.index(d) / max(1, len(dates) - 1)) * pw  # noqa: E731
    y = lambda v: top + ph - (v - lo) / (hi - lo) * ph  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">']
    parts.append(f'<text x="5" y="{top + 10}">{hi:.4g}</text><text x="5" y="{top + ph}">{lo:.4g}</text>')
    parts.append(f'<text x="{left}" y="{height - 5}">{dates[0]}</text><text x="{left + pw}" y="{height - 5}" text-anchor="end">{dates[-1]}</text>')
    for i, v in enumerate(variants):
        pts = sorted((r["date"], r[field]) for r in rows if r["variant"] == v)
        path = " ".join(f"{x(d):.1f},{y(val):.1f}" for d, val in pts)
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{left + pw + 10}" y="{top + 15 * (i + 1)}" fill="{colour}">{html.escape(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(doc: dict) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Experiment {e(doc['experiment'])}</title>",
           "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}td,th{padding:3px 8px;text-align:right}"
           "th:first-child,td:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style></head><body>",
           f"<h1>Experiment {e(doc['experiment'])}</h1>",
           f"<p>Users: {e(str(doc['users']))}. Sample ratio chi-square p = {_fmt(doc['srm']['p_value'])}. "
           f"alpha = {doc['alpha']}, correction: {e(doc['correction'])}, CUPED: {'yes' if doc['cuped'] else 'no pre-period'}.</p>",
           "<h2>Decision</h2><ul>"]
    for d in doc["decisions"]:
        out.append(f"<li><b>{e(d['action'])}</b>: {e(d['recommendation'])}</li>")
    out.append("</ul>")
    for note in doc["notes"]:
        out.append(f"<p><i>{e(note)}</i></p>")
    out.append("<h2>Relative lift with its interval</h2>" + lift_svg(doc["metrics"]))
    out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>variant</th><th>control</th><th>treatment</th><th>abs lift [CI]</th><th>rel lift [CI]</th><th>p</th><th>adj. p</th><th>test</th></tr>")
    for m in doc["metrics"]:
        c = m["comparison"]
        if c:
            cells = [f"{_fmt(c['abs_lift'])} [{_fmt(c['abs_ci'][0])}, {_fmt(c['abs_ci'][1])}]", f"{_fmt(c['rel_lift'], True)} [{_fmt(c['rel_ci'][0], True)}, {_fmt(c['rel_ci'][1], True)}]", _fmt(c["p_value"]), _fmt(c["p_adjusted"]), c["test"]]
        else:
            cells = ["", "", "", "", e(m["note"])]
        out.append(f"<tr><td>{e(m['metric'])}</td><td>{e(m['variant'])}</td><td>{_fmt(m['control_value'])}</td><td>{_fmt(m['treatment_value'])}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    out.append("<h2>CTR per day</h2>" + series_svg(doc["daily"], "ctr"))
    out.append("<h2>Listening time per day (ms)</h2>" + series_svg(doc["daily"], "listen_ms"))
    out.append("</body></html>")
    return "".join(out)
