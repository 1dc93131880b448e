"""Experiments without Ray: assignment, definitions and kill switches in a real Redis, exposure
logging, the evaluator's metrics on simulated event logs, guardrails and the decision."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import redis
from pydantic import ValidationError

from app.config import ServingSettings, settings_from_args
from app.experiments.assignment import AssignmentCache, assign, variant_for
from app.experiments.definitions import Experiment, Guardrail, Variant, apply_overrides
from app.experiments.evaluation import Evaluation, MetricResult, evaluate
from app.experiments.guardrails import check, decide
from app.experiments.metrics import DAY_MS, MetricsAccumulator, attribution_ends, combine_exposures, exposure_partial
from app.experiments.registry import ExperimentError, ExperimentRegistry
from app.experiments.report import report_html, report_json
from app.experiments.serving import ExperimentRouter, serving_with
from app.experiments.simulate import Effect, EventSimulation, simulate_events
from app.experiments.stats import Comparison, srm_chi_square
from app.keys import Keys
from app.schemas import RecommendationResponse, RecommendedTrack


def experiment(name="mmr", layer="default", traffic=1.0, weights=(1, 1), **params) -> Experiment:
    return Experiment(
        name=name,
        layer=layer,
        traffic=traffic,
        variants=[Variant(name="control", weight=weights[0]), Variant(name="treatment", weight=weights[1], params=params or {"mmr_lambda": 0.5})],
    )


@pytest.fixture
def registry(redis_client):
    return ExperimentRegistry(redis_client, Keys("t"))


def test_assignment_is_deterministic_and_follows_the_weights():
    exp = experiment(weights=(1, 3))
    users = [f"user-{i}" for i in range(20_000)]
    first = [variant_for(exp, u) for u in users]
    assert first == [variant_for(exp, u) for u in users]
    share = Counter(first)["treatment"] / len(users)
    assert abs(share - 0.75) < 0.015
    # A different salt reshuffles users independently of the first split.
    other = [variant_for(exp.model_copy(update={"salt": "v2"}), u) for u in users]
    agree = np.mean([a == b for a, b in zip(first, other)])
    assert abs(agree - (0.75**2 + 0.25**2)) < 0.015


def test_experiments_in_one_layer_are_exclusive_and_layers_are_independent(registry):
    for e in (experiment("a", traffic=0.5), experiment("b", traffic=0.5), experiment("c", layer="ui", mmr_lambda=None, artist_cap=3)):
        registry.create(e)
        registry.start(e.name)
    running, killed = registry.snapshot()
    counts = Counter()
    for i in range(10_000):
        names = tuple(sorted(a.experiment for a in assign(running, killed, f"u{i}")))
        counts[names] += 1
    assert set(counts) == {("a", "c"), ("b", "c")}  # never a and b together; everyone in c
    assert abs(counts[("a", "c")] / 10_000 - 0.5) < 0.02


def test_a_layer_refuses_an_experiment_it_has_no_room_for(registry):
    registry.create(experiment("a", traffic=0.7))
    registry.create(experiment("b", traffic=0.5))
    assert registry.start("a").buckets == (0, 700)
    with pytest.raises(ExperimentError, match="no free"):
        registry.start("b")
    registry.stop("a")
    assert registry.start("b").buckets == (0, 500)  # a stopped experiment frees its traffic


def test_a_variants_weights_reach_every_segment_and_leave_the_sources_it_does_not_name():
    """A variant's source_weights change the weights it names for new, casual and heavy
    listeners alike (every treated user is counted as treated); the others keep theirs."""
    from deployments.tuning import for_request

    defaults = ServingSettings()
    for served in (apply_overrides(defaults, {"source_weights": {"cf": 2.0}}), for_request(defaults, {"source_weights": {"cf": 2.0}})):
        for segment in ("new", "casual", "heavy"):
            assert served.weights_for(segment) == {**defaults.weights_for(segment), "cf": 2.0}
    assert apply_overrides(defaults, {"source_weights": {"new_releases": 0.0}}).weights_for("heavy")["new_releases"] == 0.0


def test_bad_overrides_are_refused_at_creation_and_ignored_when_serving(registry, redis_client):
    with pytest.raises(ValueError, match="mmr_lambda"):
        experiment(mmr_lambda=3.0)
    with pytest.raises(ValueError, match="unknown"):
        experiment(source_weights={"nonsense": 1.0})
    defaults = ServingSettings()
    assert apply_overrides(defaults, {"mmr_lambda": 0.3, "artist_cap": 5}).artist_cap == 5
    assert serving_with(defaults, {"artist_cap": -1}) == defaults
    # A hand-edited broken definition in Redis is skipped, not a failure.
    redis_client.hset(Keys("t").experiments(), "broken", json.dumps({"name": "broken", "variants": []}))
    assert registry.snapshot() == ([], set())


def test_kill_switch_stops_assignment_at_the_next_refresh_and_unreadable_redis_fails_closed(registry):
    registry.create(experiment())
    registry.start("mmr")
    now = [0.0]
    cache = AssignmentCache(registry.snapshot, refresh_interval_s=2.0, clock=lambda: now[0])
    treated = [u for u in (f"u{i}" for i in range(200)) if variant_for(registry.get("mmr"), u) == "treatment"]
    assert cache.assign(treated[0])[0].params == {"mmr_lambda": 0.5}
    registry.kill("mmr", "treatment", "test")
    now[0] = 2.5
    assert all(cache.assign(u) == [] for u in treated)
    controls = [u for u in (f"u{i}" for i in range(50)) if u not in treated]
    assert cache.assign(controls[0])[0].variant == "control"
    dead = AssignmentCache(lambda: (_ for _ in ()).throw(redis.ConnectionError("down")), 2.0)
    assert dead.assign("u1") == []


def test_exposures_are_logged_as_impressions_with_experiment_and_variant(registry, redis_client, redis_server):
    settings = settings_from_args({"redis": {"url": redis_server.url, "key_prefix": "t", "stream_key": "t:events"}})
    registry.create(experiment())
    registry.start("mmr")
    router = ExperimentRouter.from_settings(redis_client, settings)
    assignments, params = router.assign("listener-1")
    items = [RecommendedTrack(track_id=f"t{i}", score=1.0, sources=["popular"]) for i in range(3)]
    response = router.label(RecommendationResponse(user_id="listener-1", request_id="req1", cold_start=True, items=items, model_versions={}), assignments)
    assert (response.experiment, response.variant) == ("mmr", assignments[0].variant)
    assert router.log_exposures(response, assignments, latency_ms=12) == 3
    events = [json.loads(f[b"e"]) for _, f in redis_client.xrange("t:events")]
    assert [(e["event_type"], e["position"], e["experiment"], e["variant"], e["recommendation_id"], e["duration_ms"]) for e in events] == [
        ("impression", i, "mmr", assignments[0].variant, "req1", 12) for i in range(3)
    ]


def _evaluate(sim: EventSimulation, exp: Experiment, pre_period_ms: int = 7 * DAY_MS):
    events, catalogue = simulate_events(sim)
    exposures = combine_exposures([exposure_partial(events, sim.experiment)], [v.name for v in exp.variants])
    genres = pc.dictionary_encode(catalogue["genre"].combine_chunks()).indices.to_numpy().astype(np.int64)
    acc = MetricsAccumulator(exposures, sim.experiment, catalogue["track_id"].combine_chunks(), genres, pre_period_ms)
    half = events.num_rows // 2  # two slices merged must equal one pass
    users = acc.finish(acc.add(events.slice(0, half)).merge(acc.add(events.slice(half))))
    whole = acc.finish(acc.add(events))
    for k, v in users.columns.items():
        assert np.allclose(v, whole.columns[k]), k
    result = evaluate(users, exp)
    return users, result, decide(result, exp)


def test_parquet_pieces_give_the_same_metrics_as_the_table(tmp_path):
    """The job reads a file in row-group pieces with strings as Parquet dictionaries; shuffled
    events split that way must give exactly the in-memory per-user metrics and series."""
    import pyarrow.parquet as pq

    from app.experiments.metrics import exposures_in_parquet, merge_partials
    from app.parquet_pieces import read_plan

    sim = EventSimulation(n_users=300, seed=6)
    events, catalogue = simulate_events(sim)
    events = events.take(np.random.default_rng(0).permutation(events.num_rows))
    path = tmp_path / "events.parquet"
    pq.write_table(events, path, row_group_size=2000)
    plan = [part for piece in read_plan([str(path)], rows_per_piece=5000) for part in piece]
    assert len(plan) > 1
    variants = ["control", "treatment"]
    exposures = combine_exposures([exposures_in_parquet(p, groups, sim.experiment) for p, groups in plan], variants)
    expected = combine_exposures([exposure_partial(events, sim.experiment)], variants)
    assert exposures.user_ids.equals(expected.user_ids) and np.array_equal(exposures.first_ms, expected.first_ms)
    genres = pc.dictionary_encode(catalogue["genre"].combine_chunks()).indices.to_numpy().astype(np.int64)
    acc = MetricsAccumulator(exposures, sim.experiment, catalogue["track_id"].combine_chunks(), genres)
    pieces = acc.finish(merge_partials([acc.add_parquet(p, groups) for p, groups in plan]))
    whole = acc.finish(acc.add(events))
    for k, v in whole.columns.items():
        assert np.array_equal(v, pieces.columns[k]) or np.allclose(v, pieces.columns[k], rtol=1e-12), k
    assert pieces.latency_p95_ms == whole.latency_p95_ms and pieces.coverage == whole.coverage
    assert pieces.daily.equals(whole.daily)


def test_metrics_recover_the_simulated_truth_and_cuped_reduces_variance():
    exp = experiment("sim")
    users, result, _ = _evaluate(EventSimulation(n_users=4000, seed=1), exp)
    assert result.users["control"] + result.users["treatment"] == 4000
    assert result.get("treatment", "ctr").control_value == pytest.approx(0.05, rel=0.1)
    assert result.get("treatment", "skip_rate").control_value == pytest.approx(0.25, rel=0.05)
    assert result.get("treatment", "like_rate").control_value == pytest.approx(0.10, rel=0.1)
    assert result.get("treatment", "listening_ms_per_user").cuped_variance_reduction > 0.3
    assert 0 < result.get("treatment", "intra_list_diversity").control_value < 1
    # Latencies are lognormal around a 40 ms median (sigma 0.4): their p95 is 40 * e^(1.645 * 0.4).
    assert result.get("treatment", "latency_p95_ms").control_value == pytest.approx(40 * np.exp(1.645 * 0.4), rel=0.05)
    assert all(r.comparison.p_adjusted >= r.comparison.p_value for r in result.results if r.comparison)


def test_aa_keeps_running_a_harmful_variant_rolls_back_and_a_better_one_ships():
    exp = experiment("sim")
    _, aa, (aa_decision,) = _evaluate(EventSimulation(n_users=4000, seed=2), exp)
    assert aa_decision.action == "keep running" and not aa_decision.breaches
    assert not aa.srm.mismatch(0.001)

    harm = EventSimulation(n_users=4000, seed=3, effects={"treatment": Effect(skip=0.4)})
    _, _, (bad,) = _evaluate(harm, exp)
    assert bad.action == "roll back"
    assert "skip_rate worse by more than 5%" in bad.recommendation and "[+" in bad.recommendation

    slow = EventSimulation(n_users=2000, seed=4, effects={"treatment": Effect(latency=20.0)})
    _, _, (slow_decision,) = _evaluate(slow, exp)
    assert slow_decision.action == "roll back" and "latency_p95_ms" in slow_decision.recommendation

    better = EventSimulation(n_users=8000, seed=5, effects={"treatment": Effect(ctr=0.5)})
    users, result, (good,) = _evaluate(better, exp)
    assert good.action == "ship", good.recommendation
    assert "ctr" in good.recommendation and "adjusted p=" in good.recommendation

    doc = report_json(result, [good], users)
    page = report_html(json.loads(json.dumps(doc)))  # the JSON is plain JSON (no NaN)
    assert page.count("<svg") == 3 and "ship" in page and "ctr" in page


def test_cli_creates_starts_lists_and_stops(tmp_path, redis_server, capsys):
    from app.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"applications": [{"name": "echotune", "args": {"redis": {"url": redis_server.url, "key_prefix": "cli"}}}]}))
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: cap3\nvariants:\n  - {name: control, weight: 1}\n  - {name: cap3, weight: 1, params: {artist_cap: 3}}\n")
    run = lambda *a: main(["--config", str(cfg), "experiments", *a])  # noqa: E731
    assert run("create", "--file", str(spec)) == 0
    assert run("start", "cap3") == 0
    assert run("list") == 0 and "cap3" in capsys.readouterr().out
    assert run("stop", "cap3") == 0
    assert run("start", "nope") == 1
    spec.write_text("name: bad\nvariants: [{name: control, weight: 1}, {name: x, weight: 1, params: {mmr_lambda: 9}}]\n")
    assert run("create", "--file", str(spec)) == 2 and "mmr_lambda" in capsys.readouterr().err


def test_a_treatment_that_breaks_completely_is_rolled_back():
    """No plays and no clicks at all in the treatment: every mean and rate it has is 0, where
    the log-ratio interval does not exist. Without a pre-period (no CUPED) nothing else
    rescues it: the guardrails must still see a -100% collapse and roll it back."""
    broken = EventSimulation(n_users=2000, seed=3, effects={"treatment": Effect(ctr=-1.0, listening=-1.0)})
    _, result, (decision,) = _evaluate(broken, experiment("sim"), pre_period_ms=0)
    assert decision.action == "roll back", decision.recommendation
    breached = {(b.metric, b.severity) for b in decision.breaches}
    assert {("listening_ms_per_user", "critical"), ("skip_rate", "critical")} <= breached  # skip_rate: no plays left to rate
    assert {("ctr", "warning"), ("like_rate", "warning"), ("sessions_per_user", "warning")} <= breached
    assert result.get("treatment", "skip_rate").collapsed and "treatment has no plays" in decision.recommendation


def test_guardrails_fall_back_to_the_absolute_interval_when_the_relative_one_does_not_exist():
    def result(control, abs_ci, p):
        diff = sum(abs_ci) / 2
        c = Comparison("welch_t", control, control + diff, diff, abs_ci, diff / control, (float("nan"), float("nan")), -9.0, p, 500, 500, 1.0)
        return MetricResult("listening_ms_per_user", "treatment", True, c, control, control + diff)

    degradation = Guardrail(metric="listening_ms_per_user", kind="degradation", tolerance=0.05, severity="critical")
    # Control 100, treatment 0, the difference's interval [-110, -90]: -110% to -90% of control.
    breach, safe = check(degradation, result(100.0, (-110.0, -90.0), 1e-30), alpha=0.05)
    assert breach is not None and breach.severity == "critical" and not safe
    assert "[-110.00%, -90.00%]" in breach.message
    # An interval of [-4, +3] on a control of 100 is within the 5% tolerance: shown safe.
    assert check(degradation, result(100.0, (-4.0, 3.0), 0.7), alpha=0.05) == (None, True)
    # A statistical guardrail needs only the p-value and the direction.
    statistical = Guardrail(metric="listening_ms_per_user", kind="statistical")
    assert check(statistical, result(100.0, (-110.0, -90.0), 1e-30), alpha=0.05)[0].kind == "statistical"


@pytest.mark.parametrize(
    "definition,field,message",
    [
        ({"guardrails": [{"metric": "latency_p95", "kind": "threshold", "max": 500}]}, ("guardrails", 0, "metric"), "unknown metric 'latency_p95'"),
        ({"guardrails": [{"metric": "skip-rate", "kind": "degradation"}]}, ("guardrails", 0, "metric"), "unknown metric 'skip-rate'"),
        ({"primary_metric": "CTR"}, ("primary_metric",), "unknown metric 'CTR'"),
        ({"primary_metric": "coverage"}, ("primary_metric",), "descriptive"),
        ({"guardrails": [{"metric": "latency_p95_ms", "kind": "statistical"}]}, ("guardrails", 0), "only a threshold guardrail"),
    ],
)
def test_a_guardrail_or_primary_metric_the_evaluator_never_reports_is_refused(definition, field, message):
    base = {"name": "x", "variants": [{"name": "control", "weight": 1}, {"name": "t", "weight": 1}]}
    with pytest.raises(ValidationError) as info:
        Experiment.model_validate({**base, **definition})
    error = info.value.errors()[0]
    assert error["loc"] == field and message in error["msg"]
    if "unknown" in message:
        assert "latency_p95_ms" in error["msg"] and "skip_rate" in error["msg"]  # the valid names are listed


def test_the_sample_ratio_check_uses_the_configured_threshold_and_quotes_itself():
    exp = experiment("sim")
    srm = srm_chi_square([1000, 1100], [1, 1])  # p = 0.029
    notes = ["3 users were exposed to more than one variant and are excluded"]

    def decision(threshold):
        users = {"control": 1000, "treatment": 1100}
        e = Evaluation("sim", 0.05, "holm", users, srm, [], conflicting_users=3, notes=notes, srm_threshold=threshold, srm_arms=list(users))
        return decide(e, exp)[0]

    flagged = [b for b in decision(0.05).breaches if b.kind == "srm"]
    assert len(flagged) == 1 and "sample ratio mismatch" in flagged[0].message and "p=0.029" in flagged[0].message
    assert not [b for b in decision(0.001).breaches if b.kind == "srm"]


def test_after_a_rollback_the_killed_arm_stops_counting_and_the_survivor_can_ship():
    """Three arms; `broken` is killed a day in. Its users then get the defaults and are no
    longer exposed, while control and `better` keep gaining users. The kill must neither make
    the split look broken nor let `broken`'s later events count, and `better` can ship."""
    exp = Experiment(name="sim", variants=[Variant(name=n, weight=1) for n in ("control", "broken", "better")])
    sim = EventSimulation(
        variants=("control", "broken", "better"), weights=(1, 1, 1), n_users=9000, seed=5, effects={"better": Effect(ctr=0.5), "broken": Effect(skip=0.4)}
    )
    events, _ = simulate_events(sim)
    kill_ms = sim.start_ms + DAY_MS
    ts = pc.cast(events["timestamp"], "int64").to_numpy()
    unserved = (events["variant"].to_numpy(zero_copy_only=False) == "broken") & (ts >= kill_ms)
    events = events.filter(~unserved)  # no exposures after the kill; the users' plays go on

    ends = attribution_ends(["control", "broken", "better"], None, {"broken": kill_ms})
    assert ends == {"broken": kill_ms}
    exposures = combine_exposures([exposure_partial(events, "sim")], ["control", "broken", "better"], ends)
    acc = MetricsAccumulator(exposures, "sim")
    users = acc.finish(acc.add(events))

    # Known answer: a broken user's plays are those from their first exposure up to the kill.
    play_rows = events.filter(pc.equal(events["event_type"], "play"))
    plays = play_rows.select(["user_id"]).to_pandas().assign(ts=pc.cast(play_rows["timestamp"], "int64").to_numpy())
    first = dict(zip(exposures.user_ids.to_pylist(), exposures.first_ms))
    broken_users = [u for u, v in zip(exposures.user_ids.to_pylist(), exposures.variant_idx) if v == 1]
    expected = plays[plays["user_id"].isin(broken_users)]
    expected = expected[(expected["ts"] >= expected["user_id"].map(first)) & (expected["ts"] < kill_ms)]
    assert users.arm("broken", "plays").sum() == len(expected) > 0

    blind = evaluate(users, exp)  # not told of the kill: the frozen arm looks like a broken split
    assert blind.srm_mismatch
    result = evaluate(users, exp, killed={"broken"})
    assert not result.srm_mismatch and result.srm_arms == ["control", "better"]
    decisions = decide(result, exp)
    assert [d.variant for d in decisions] == ["better"]  # the killed arm is never decided on again
    assert decisions[0].action == "ship", decisions[0].recommendation
    # A stop closes every arm's window; a kill before it closes that arm's earlier.
    assert attribution_ends(["control", "a", "b"], 5000, {"a": 3000, "b": 7000}) == {"control": 5000, "a": 3000, "b": 5000}


def test_a_failed_refresh_fails_closed_and_is_counted_by_the_background_refresh(tmp_path):
    from app.redis_server import EmbeddedRedis
    from app.refresh import BackgroundRefresh

    server = EmbeddedRedis(tmp_path, appendonly=False).start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    registry = ExperimentRegistry(client, Keys("t"))
    registry.create(experiment())
    registry.start("mmr")
    cache = AssignmentCache(registry.snapshot, refresh_interval_s=float("inf"))
    cache.refresh()
    assert cache.assign("u1")[0].experiment == "mmr"
    server.stop()  # now the kill switches cannot be read

    failed = []

    def refresh_once():
        try:
            cache.refresh()
        finally:
            refresher._stop.set()  # one tick is enough

    refresher = BackgroundRefresh(refresh_once, interval_s=0.01, name="experiments", on_failure=failed.append)
    refresher.start()
    refresher._thread.join()
    assert failed == ["experiments"] and refresher.failures == 1  # what refresh_failures counts
    assert cache.assign("u1") == []  # fails closed: nobody is assigned a variant that may be killed


def test_start_refuses_a_shared_salt_or_an_override_another_layer_sets(registry):
    registry.create(experiment("a", traffic=0.5, mmr_lambda=0.5))
    registry.start("a")
    registry.create(experiment("same-key", layer="ui", mmr_lambda=0.2))
    with pytest.raises(ExperimentError, match=r"overrides \['mmr_lambda'\].*'a'"):
        registry.start("same-key")
    registry.create(experiment("same-salt", layer="ui", artist_cap=3).model_copy(update={"salt": "a"}))
    with pytest.raises(ExperimentError, match="salt 'a'.*'a'"):
        registry.start("same-salt")
    assert {registry.get(n).status for n in ("same-key", "same-salt")} == {"draft"}
    # The same key in the same layer is fine (its users are disjoint), and so is another key.
    registry.create(experiment("b", traffic=0.5, mmr_lambda=0.3))
    registry.create(experiment("caps", layer="ui", artist_cap=3))
    assert registry.start("b").status == registry.start("caps").status == "running"


def test_a_second_kill_keeps_the_first_kill_time(registry):
    exp = registry.create(experiment("a"))
    registry.kill("a", "treatment", "first")
    first = registry.killed()["a/treatment"]
    registry.kill("a", "treatment", "second")
    assert registry.killed()["a/treatment"] == first
    assert registry.killed_at(exp) == {"treatment": first["at_ms"]}
