"""Redis at its memory limit (noeviction): ingestion refuses whole requests with a message that
says the store is full, stores nothing of a refused request, loses nothing it acknowledged,
and takes the same events once the limit is raised (scripts/fault_drills.py drill 4). The
consumer waits a full Redis out without dead-lettering, and an export run makes room again."""

import pytest

from app.events.enrichment import RequestContext
from app.events.ingest import StorageUnavailable
from app.keys import Keys
from app.schemas import EventStatus
from tests.test_events_enrichment_auth import NOW, event, ingestor


def test_full_redis_refuses_with_a_clear_message_and_drops_nothing(redis_client):
    ing, ctx = ingestor(redis_client), RequestContext(received_at_ms=0)
    acknowledged, refused = [], None
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", int(redis_client.info("memory")["used_memory"]) + 256 * 1024)
    try:
        for _ in range(200):
            batch = [event(i, user=f"u{i % 7}") for i in range(50)]
            try:
                response = ing.ingest({"events": batch}, ctx, NOW)
            except StorageUnavailable as exc:
                refused = (batch, exc)
                break
            acknowledged += [r.event_id for r in response.results if r.status == EventStatus.accepted]
    finally:
        redis_client.config_set("maxmemory", 0)
    assert refused is not None, "the memory limit was never reached"
    batch, exc = refused
    assert "full" in exc.detail and "maxmemory" in exc.detail
    stored = {e.event["event_id"] for e in ing.stream.read(count=100_000)}
    assert {str(i) for i in acknowledged} <= stored
    assert not {e["event_id"] for e in batch} & stored  # all or nothing

    again = ing.ingest({"events": batch}, ctx, NOW)
    assert again.accepted == len(batch)


def fill_to_maxmemory(client, ing, margin: int) -> tuple[list[str], list[dict]]:
    """Ingest until Redis refuses; returns the acknowledged event ids and the refused batch."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + margin)
    acknowledged = []
    for n in range(400):
        batch = [event(i, user=f"f{n}-{i % 7}") for i in range(50)]
        try:
            response = ing.ingest({"events": batch}, RequestContext(received_at_ms=0), NOW)
        except StorageUnavailable:
            return acknowledged, batch
        acknowledged += [str(r.event_id) for r in response.results if r.status == EventStatus.accepted]
    raise AssertionError("the memory limit was never reached")


def test_consumer_at_maxmemory_keeps_entries_pending_instead_of_dead_lettering(redis_client):
    """Its writes refused (OOM), the consumer backs off and leaves the batch pending, held for
    its next poll without counting deliveries; nothing goes to the dead-letter stream (which
    would grow a full Redis further). Once there is room, every entry is applied once."""
    from app.events.consumer import RedisRefused
    from tests.test_events_consumer import DLQ, GROUP, STREAM, add_events, consumer, counters, expected_counters, updates

    events = add_events(redis_client, 12)
    sleeps: list[float] = []
    c = consumer(redis_client, updates(redis_client), sleeps=sleeps)
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)  # every write that needs memory is refused
    try:
        for _ in range(2):  # the first poll reads the batch, the second retries the held one
            with pytest.raises(RedisRefused, match="OOM"):
                c.poll(block_ms=10)
        assert redis_client.xlen(DLQ) == 0 and c.stats.dead_lettered == 0
        pending = redis_client.xpending_range(STREAM, GROUP, "-", "+", 100)
        assert len(pending) == len(events) and {p["times_delivered"] for p in pending} == {1}
        assert len(sleeps) == 2 * (c.settings.max_attempts - 1), "each poll backed off between its attempts"
    finally:
        redis_client.config_set("maxmemory", 0)
    stats = c.drain(block_ms=10)
    assert stats.applied == len(events) and stats.dead_lettered == 0
    assert counters(redis_client, Keys("t"), {e["track_id"] for e in events}) == expected_counters(events)
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_export_at_maxmemory_lands_the_events_and_makes_room_for_ingest(redis_server, redis_client, tmp_path):
    """Full Redis, and the 503 says so: an export run trims what earlier runs exported (and the
    consumers have acknowledged) before it writes anything, so it can run, land the new events,
    and leave room for the refused batch."""
    import pandas as pd

    from app.config import settings_from_args
    from jobs.export_events import export_events

    settings = settings_from_args({
        "redis": {"url": redis_server.url, "stream_key": "s", "dead_letter_key": "dlq", "key_prefix": "x"},
        "paths": {"state_dir": str(tmp_path)},
        "consumer": {"group": "g"},
    })  # fmt: skip
    ing = ingestor(redis_client)
    redis_client.xgroup_create("s", "g", id="0", mkstream=True)
    earlier = []
    for n in range(40):
        response = ing.ingest({"events": [event(i, user=f"e{n}") for i in range(50)]}, RequestContext(received_at_ms=0), NOW)
        earlier += [str(r.event_id) for r in response.results]
    assert export_events(settings)["trimmed"] == 0, "the group has not read them yet"
    delivered = redis_client.xreadgroup("g", "c", {"s": ">"}, count=len(earlier))[0][1]
    redis_client.xack("s", "g", *[i for i, _ in delivered])
    try:
        acknowledged, refused = fill_to_maxmemory(redis_client, ing, margin=64 * 1024)
        summary = export_events(settings, backoff_s=0.01)
        again = ing.ingest({"events": refused}, RequestContext(received_at_ms=0), NOW)
    finally:
        redis_client.config_set("maxmemory", 0)
    assert summary["exported"] == len(acknowledged) and summary["trimmed"] >= len(earlier)
    assert again.accepted == len(refused)
    exported = pd.read_parquet(settings.paths.events_dir)
    assert exported["event_id"].is_unique and sorted(exported["event_id"]) == sorted(earlier + acknowledged)
