"""Redis at its memory limit (noeviction): ingestion refuses whole requests with a message that
says the store is full, stores nothing of a refused request, loses nothing it acknowledged,
and takes the same events once the limit is raised (scripts/fault_drills.py drill 4)."""

from app.events.enrichment import RequestContext
from app.events.ingest import StorageUnavailable
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
