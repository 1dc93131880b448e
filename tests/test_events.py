import uuid
from datetime import datetime, timedelta, timezone

import pytest

from app.config import GatewaySettings
from app.events.dead_letter import DeadLetterQueue
from app.events.stream import EventStream
from app.events.validation import EventValidationError, parse_events
from tests.waiting import poll

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def event(**over):
    doc = {"event_id": str(uuid.uuid4()), "user_id": "u1", "track_id": "t1", "event_type": "play", "timestamp": "2026-11-26T11:59:00Z"}
    doc.update(over)
    return doc


def test_single_event_and_batch_parse():
    assert len(parse_events(event(), GatewaySettings(), NOW)) == 1
    assert len(parse_events({"events": [event(), event()]}, GatewaySettings(), NOW)) == 2


def test_epoch_millis_and_naive_iso_are_utc():
    ms = int(NOW.timestamp() * 1000)
    (e,) = parse_events(event(timestamp=ms), GatewaySettings(), NOW)
    assert e.timestamp == NOW
    (e,) = parse_events(event(timestamp="2026-11-26T12:00:00"), GatewaySettings(), NOW)
    assert e.timestamp == NOW


@pytest.mark.parametrize(
    "bad, loc",
    [
        ({"event_type": "listen"}, ["body", "events", 1, "event_type"]),
        ({"event_id": "nope"}, ["body", "events", 1, "event_id"]),
        ({"user_id": ""}, ["body", "events", 1, "user_id"]),
        ({"timestamp": "yesterday"}, ["body", "events", 1, "timestamp"]),
        ({"colour": "red"}, ["body", "events", 1, "colour"]),
    ],
)
def test_malformed_event_names_its_field(bad, loc):
    with pytest.raises(EventValidationError) as info:
        parse_events({"events": [event(), event(**bad)]}, GatewaySettings(), NOW)
    assert info.value.errors[0]["loc"] == loc


def test_time_horizon():
    future = (NOW + timedelta(minutes=10)).isoformat()
    with pytest.raises(EventValidationError, match="future"):
        parse_events(event(timestamp=future), GatewaySettings(), NOW)
    with pytest.raises(EventValidationError, match="older"):
        parse_events(event(timestamp="2001-01-01T00:00:00Z"), GatewaySettings(max_age_days=30), NOW)


def test_batch_size_limit():
    with pytest.raises(EventValidationError, match="at most 2"):
        parse_events({"events": [event()] * 3}, GatewaySettings(max_batch=2), NOW)


def pending(events, received_at_ms=1):
    from app.events.enrichment import RequestContext, enrich
    from app.events.stream import PendingEvent

    ctx = RequestContext(received_at_ms=received_at_ms)
    out = []
    for e in events:
        enriched = enrich(e, ctx)
        out.append(PendingEvent(e.event_id, e.user_id, enriched.document["timestamp"], enriched.fingerprint, enriched.json))
    return out


def test_stream_append_is_idempotent_per_event_id(redis_client):
    from app.events.stream import AppendStatus

    stream = EventStream(redis_client, "s", "dedup:")
    a, b = parse_events({"events": [event(), event()]}, GatewaySettings(), NOW)
    first = stream.append(pending([a, b], 1))
    again = stream.append(pending([a, b], 2))
    assert [r.status for r in first] == [AppendStatus.accepted] * 2 and all(r.stream_id for r in first)
    assert [r.status for r in again] == [AppendStatus.duplicate] * 2
    entries = stream.read()
    assert [e.event["event_id"] for e in entries] == [str(a.event_id), str(b.event_id)]
    assert entries[0].event["received_at_ms"] == 1 and entries[0].event["schema_version"] == 1


def test_reused_event_id_with_other_content_is_a_conflict_not_stored(redis_client):
    from app.events.stream import AppendStatus

    stream = EventStream(redis_client, "s", "dedup:")
    doc = event()
    (a,) = parse_events(doc, GatewaySettings(), NOW)
    (b,) = parse_events({**doc, "track_id": "t2"}, GatewaySettings(), NOW)
    assert stream.append(pending([a]))[0].status is AppendStatus.accepted
    assert stream.append(pending([b]))[0].status is AppendStatus.conflict
    assert stream.length() == 1


def test_dedup_remembers_an_id_for_its_window_in_a_few_expiring_buckets(redis_client):
    """Memory stays bounded under sustained ingest: markers live in at most DEDUP_BUCKETS + 1
    bucket hashes, each gone a window (plus one bucket) after it closes; after that a resend
    is a new event again."""
    from app.events.stream import DEDUP_BUCKETS, AppendStatus, dedup_bucket_ms

    stream = EventStream(redis_client, "s", "dedup:", dedup_window_s=1)
    (a,) = parse_events(event(), GatewaySettings(), NOW)
    assert stream.append(pending([a]))[0].status is AppendStatus.accepted
    def redis_bucket() -> int:  # the bucket Redis's own clock is in, as the append script sees it
        seconds, micros = redis_client.time()
        return (seconds * 1000 + micros // 1000) // dedup_bucket_ms(1)

    for _ in range(3):
        stream.append(pending(parse_events({"events": [event() for _ in range(50)]}, GatewaySettings(), NOW)))
        assert stream.append(pending([a]))[0].status is AppendStatus.duplicate
        started = redis_bucket()
        poll(redis_bucket, lambda b: b != started, 1_000_000)  # the next appends land in the next bucket
    buckets = redis_client.keys("dedup:*")
    assert 1 <= len(buckets) <= DEDUP_BUCKETS + 1
    assert all(redis_client.pttl(b) != -1 for b in buckets)  # none without an expiry (-1)
    poll(lambda: redis_client.keys("dedup:*"), lambda keys: not keys, 1_000_000)  # until Redis has expired every bucket (KEYS drops expired keys)
    assert redis_client.keys("dedup:*") == []
    assert stream.append(pending([a]))[0].status is AppendStatus.accepted


def test_stream_reads_in_chunks_after_a_cursor(redis_client):
    stream = EventStream(redis_client, "s", "dedup:")
    events = parse_events({"events": [event() for _ in range(5)]}, GatewaySettings(), NOW)
    stream.append(pending(events))
    chunks = list(stream.iter_from("0-0", chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert stream.read(after=chunks[0][-1].id)[0].id == chunks[1][0].id


def test_dead_letter_keeps_record_and_reason(redis_client):
    dlq = DeadLetterQueue(redis_client, "dlq")
    dlq.put("job", {"track_id": "t9"}, "cannot decode")
    (entry,) = dlq.entries()
    assert entry["reason"] == "cannot decode" and '"t9"' in entry["record"] and len(dlq) == 1


def test_a_batch_job_rerun_dead_letters_each_bad_row_once(redis_client):
    """A batch job meets its input's bad rows on every run; the queue keeps one letter per row.
    Equal rows are still one letter each, a row added since is written, a letter an operator
    deleted stays deleted, and another job's letters are its own."""
    dlq = DeadLetterQueue(redis_client, "dlq")
    bad = [({"track_id": "t1"}, "silent"), ({"track_id": "t1"}, "silent"), ({"track_id": "t2"}, "undecodable")]
    assert dlq.put_many("embed", bad, chunk=2, once=True) == 3
    assert dlq.put_many("embed", bad, chunk=2, once=True) == 0 and len(dlq) == 3
    assert dlq.put_many("embed", [*bad, ({"track_id": "t1"}, "silent"), ({"track_id": "t2"}, "missing_file")], once=True) == 2
    assert sorted((e["record"], e["reason"]) for e in dlq.entries()) == [
        ('{"track_id": "t1"}', "silent")] * 3 + [('{"track_id": "t2"}', "missing_file"), ('{"track_id": "t2"}', "undecodable")]

    handled = dlq.entries()[0]["id"]
    redis_client.xdel("dlq", handled)
    assert dlq.put_many("embed", bad, once=True) == 0 and handled not in {e["id"] for e in dlq.entries()}
    assert dlq.put_many("train", bad[:1], once=True) == 1 and len(dlq) == 5


def test_trim_keeps_what_a_consumer_group_has_not_acknowledged(redis_client):
    from app.events.stream import trim_exported

    ids = [redis_client.xadd("s", {"e": "{}"}).decode() for _ in range(6)]
    redis_client.xgroup_create("s", "g", id="0")
    redis_client.xreadgroup("g", "c", {"s": ">"}, count=4)  # 4 delivered, none acknowledged
    redis_client.xack("s", "g", ids[0], ids[1])
    trim_exported(redis_client, "s", exported_through=ids[4])
    assert [i.decode() for i, _ in redis_client.xrange("s")] == ids[2:], "pending entries stay"
    redis_client.xack("s", "g", ids[2], ids[3])
    trim_exported(redis_client, "s", exported_through=ids[4])
    assert [i.decode() for i, _ in redis_client.xrange("s")] == ids[4:], "nor past what the group has not read"


def test_trim_keeps_everything_until_the_configured_consumer_group_exists(redis_client):
    from app.events.stream import trim_exported

    ids = [redis_client.xadd("s2", {"e": "{}"}).decode() for _ in range(4)]
    assert trim_exported(redis_client, "s2", exported_through=ids[-1], required_groups=["g"]) == 0
    assert redis_client.xlen("s2") == 4, "the group, once created at 0, must still find every event"
    redis_client.xgroup_create("s2", "g", id="0")
    delivered = redis_client.xreadgroup("g", "c", {"s2": ">"}, count=3)[0][1]
    redis_client.xack("s2", "g", *[i for i, _ in delivered])
    trim_exported(redis_client, "s2", exported_through=ids[-1], required_groups=["g"])
    assert [i.decode() for i, _ in redis_client.xrange("s2")] == ids[3:], "then only what it has acknowledged goes"
