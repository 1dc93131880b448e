"""Values at the edges of what an event can hold: the gateway answers 422 naming the field for
anything the export could not store, and an export that meets such a value anyway (written
before this check, or by hand) dead-letters it once and carries on. Also: one export run at a
time. Real Redis throughout, no Ray."""

import json

import pandas as pd
import pytest

from app.config import GatewaySettings, settings_from_args
from app.events.dead_letter import DeadLetterQueue
from app.events.enrichment import RequestContext
from app.events.stream import StreamEntry
from app.events.validation import EventValidationError, parse_events
from app.keys import Keys
from app.schemas import INT64_MAX, parse_timestamp
from tests.test_events_enrichment_auth import NOW, event, ingestor


@pytest.mark.parametrize("field", ["duration_ms", "position"])
def test_a_count_beyond_int64_is_refused_naming_its_field(field):
    (ok,) = parse_events(event(0, **{field: INT64_MAX}), GatewaySettings(), NOW)
    assert getattr(ok, field) == INT64_MAX
    with pytest.raises(EventValidationError) as info:
        parse_events({"events": [event(0), event(1, **{field: 2**64})]}, GatewaySettings(), NOW)
    (error,) = info.value.errors
    assert error["loc"] == ["body", "events", 1, field] and str(INT64_MAX) in error["msg"]


@pytest.mark.parametrize(
    "value",
    [1e20, -1e20, float("inf"), float("-inf"), 10**400, "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"],
    ids=["1e20-ms", "-1e20-ms", "inf", "-inf", "10^400-ms", "after-9999-in-utc", "before-year-1-in-utc"],
)
def test_a_timestamp_outside_what_a_date_can_hold_is_a_validation_error(value):
    with pytest.raises(ValueError, match="timestamp out of range"):
        parse_timestamp(value)
    with pytest.raises(EventValidationError) as info:
        parse_events(event(0, timestamp=value), GatewaySettings(), NOW)
    (error,) = info.value.errors
    assert error["loc"] == ["body", "timestamp"] and "out of range" in error["msg"]


def test_the_last_representable_instants_still_parse():
    assert parse_timestamp("9999-12-31T23:59:59+00:00").year == 9999
    assert parse_timestamp("0001-01-01T00:00:00-01:00").year == 1


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"duration_ms": 2**64}, "duration_ms 18446744073709551616 is out of range for its int64 column"),
        ({"position": -(2**63) - 1}, "position -9223372036854775809 is out of range for its int64 column"),
        ({"schema_version": 2**31}, "schema_version 2147483648 is out of range for its int32 column"),
        ({"timestamp": 2**62}, "timestamp 4611686018427387904 is out of range for its timestamp[ms, tz=UTC] column"),
        ({"received_at_ms": 2**62}, "received_at_ms 4611686018427387904 is out of range for its timestamp[ms, tz=UTC] column"),
        ({"duration_ms": 1.5}, "duration_ms is not an integer"),
        ({"position": True}, "position is not an integer"),
        ({"user_id": 7}, "user_id is not a string"),
        ({"duration_ms": INT64_MAX, "position": 0}, None),
    ],
)
def test_export_problem_names_a_value_its_column_cannot_hold(change, problem):
    from jobs.export_events import export_problem

    doc = {"event_id": "e1", "user_id": "u1", "track_id": "t1", "event_type": "play", "timestamp": 1_700_000_000_000,
           "received_at_ms": 1_700_000_000_000, "schema_version": 1, **change}  # fmt: skip
    assert export_problem(StreamEntry(id="1-0", event=doc)) == problem


def export_settings(redis_server, tmp_path):
    return settings_from_args({
        "redis": {"url": redis_server.url, "stream_key": "s", "dead_letter_key": "dlq", "key_prefix": "x"},
        "paths": {"state_dir": str(tmp_path)},
    })  # fmt: skip


def ingest(client, n: int, start: int = 0) -> list[str]:
    response = ingestor(client).ingest({"events": [event(start + i) for i in range(n)]}, RequestContext(received_at_ms=1), NOW)
    return [str(r.event_id) for r in response.results]


def add_out_of_range(client) -> dict:
    """An entry the gateway no longer accepts, as one stored before the bound existed."""
    doc = {**json.loads(client.xrange("s", count=1)[0][1][b"e"]), "event_id": "11111111-1111-4111-8111-111111111111", "duration_ms": 2**64}
    client.xadd("s", {"e": json.dumps(doc)})
    return doc


def test_export_dead_letters_a_value_out_of_range_and_lands_the_rest(redis_server, redis_client, tmp_path):
    from jobs.export_events import export_events

    settings = export_settings(redis_server, tmp_path)
    good = ingest(redis_client, 3)
    bad = add_out_of_range(redis_client)
    good += ingest(redis_client, 2, start=3)
    summary = export_events(settings, chunk=4)
    again = export_events(settings)
    assert summary["exported"] == 5 and summary["dead_lettered"] == 1
    assert again["exported"] == again["dead_lettered"] == 0, "the cursor moved past the bad entry"
    exported = pd.read_parquet(settings.paths.events_dir)
    assert sorted(exported["event_id"]) == sorted(good)
    (letter,) = DeadLetterQueue(redis_client, "dlq").entries()
    assert letter["stage"] == "export" and "duration_ms" in letter["reason"] and json.loads(letter["record"]) == bad


def test_a_redone_chunk_does_not_dead_letter_its_entries_again(redis_server, redis_client, tmp_path, monkeypatch):
    import jobs.export_events as export_job

    settings = export_settings(redis_server, tmp_path)
    good = ingest(redis_client, 2)
    redis_client.xadd("s", {"e": b"{not json"})
    real_write = export_job._write_chunk

    def write_then_crash(*args):
        real_write(*args)
        raise RuntimeError("export process died after writing the chunk, before moving the cursor")

    monkeypatch.setattr(export_job, "_write_chunk", write_then_crash)
    with pytest.raises(RuntimeError, match="died"):
        export_job.export_events(settings)
    monkeypatch.setattr(export_job, "_write_chunk", real_write)
    resumed = export_job.export_events(settings)
    assert resumed["exported"] == 2 and resumed["dead_lettered"] == 0
    assert len(DeadLetterQueue(redis_client, "dlq")) == 1
    assert sorted(pd.read_parquet(settings.paths.events_dir)["event_id"]) == sorted(good)


def test_a_second_export_run_exits_while_one_is_running(redis_server, redis_client, tmp_path, monkeypatch):
    """Two runs at once (the pipeline's export stage and a manual job) would read the same cursor
    and write the same files; the second finds the first's lock and leaves the stream to it."""
    import jobs.export_events as export_job

    settings = export_settings(redis_server, tmp_path)
    acked = ingest(redis_client, 9)
    real_write, second = export_job._write_chunk, []

    def write_while_another_run_starts(*args):
        if not second:  # once: the second run's own chunks do not start a third
            second.append("started")
            second[0] = export_job.export_events(settings, chunk=2)
        return real_write(*args)

    monkeypatch.setattr(export_job, "_write_chunk", write_while_another_run_starts)
    first = export_job.export_events(settings, chunk=4)
    (other,) = second
    assert "another export" in other.get("skipped", "") and other["exported"] == 0
    assert first["exported"] == 9
    exported = pd.read_parquet(settings.paths.events_dir)
    assert exported["event_id"].is_unique and sorted(exported["event_id"]) == sorted(acked)
    monkeypatch.setattr(export_job, "_write_chunk", real_write)
    assert "skipped" not in export_job.export_events(settings), "the lock is released when a run ends"


def test_a_run_that_lost_its_lock_leaves_the_cursor_to_the_new_holder(redis_server, redis_client, tmp_path, monkeypatch):
    """A run stalled past the lock's expiry while another took over: its late commit would move
    the cursor back or drop the new run's in-flight marker, so it is refused."""
    import jobs.export_events as export_job

    settings = export_settings(redis_server, tmp_path)
    ingest(redis_client, 3)
    keys = Keys("x")
    real_write = export_job._write_chunk

    def write_while_the_lock_passes_on(*args):
        redis_client.set(keys.export_lock(), "another run")
        return real_write(*args)

    monkeypatch.setattr(export_job, "_write_chunk", write_while_the_lock_passes_on)
    summary = export_job.export_events(settings)
    assert "took it over" in summary["skipped"] and summary["exported"] == 0
    assert redis_client.get(keys.export_cursor()) is None and redis_client.exists(keys.export_inflight())
    assert redis_client.get(keys.export_lock()) == b"another run", "its holder's lock is not released"
