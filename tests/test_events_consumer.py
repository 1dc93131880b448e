"""The consumer group: exactly-once online updates, retries with backoff, dead letters, claiming
from a killed consumer (real Ray actors), and replay of dead letters. Real Redis throughout."""

import json
import math
import random
import time
import uuid
from collections import Counter

import pytest

from app.config import ConsumerSettings, settings_from_args
from app.events.consumer import OnlineUpdates, StreamConsumer, TransientError, backoff_delay
from app.events.dead_letter import DeadLetterQueue
from app.keys import Keys
from tests.waiting import poll

STREAM, DLQ, GROUP = "ev", "ev:dlq", "online-updates"


def add_events(client, n: int, users: int = 3, tracks: int = 4) -> list[dict]:
    events = []
    for i in range(n):
        e = {"event_id": str(uuid.uuid4()), "user_id": f"u{i % users}", "track_id": f"t{i % tracks}",
             "event_type": "play" if i % 5 else "like", "timestamp": 1_700_000_000_000 + i}
        client.xadd(STREAM, {"e": json.dumps(e)})
        events.append(e)
    return events


def expected_counters(events) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for e in events:
        out.setdefault(e["track_id"], Counter())[e["event_type"]] += 1
    return out


def counters(client, keys: Keys, tracks) -> dict[str, Counter]:
    return {t: Counter({k.decode(): int(v) for k, v in client.hgetall(keys.track_counters(t)).items()}) for t in tracks}


class Flaky:
    """Wraps a stage: raises TransientError for the first `failures` calls."""

    name = "online_updates"

    def __init__(self, inner, failures: int):
        self.inner, self.failures, self.calls = inner, failures, 0

    def apply(self, entries):
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("feature store briefly unavailable")
        return self.inner.apply(entries)


def consumer(client, stage, settings=ConsumerSettings(max_attempts=3, backoff_base_s=0.1, backoff_max_s=0.15), sleeps=None, name="c1"):
    c = StreamConsumer(client, STREAM, settings, name, stage, DeadLetterQueue(client, DLQ), sleep=(sleeps.append if sleeps is not None else lambda s: None), rng=random.Random(0))
    c.ensure_group()
    return c


def updates(client, keys=Keys("t")):
    return OnlineUpdates(client, keys, STREAM, GROUP, keep=3)


def test_online_updates_applied_once_and_recent_plays_kept(redis_client):
    keys = Keys("t")
    events = add_events(redis_client, 40)
    c = consumer(redis_client, updates(redis_client))
    stats = c.drain(block_ms=10)
    assert stats.applied == 40 and stats.dead_lettered == 0
    assert counters(redis_client, keys, {e["track_id"] for e in events}) == expected_counters(events)
    u0_plays = [e["track_id"] for e in events if e["user_id"] == "u0" and e["event_type"] == "play"]
    assert [t.decode() for t in redis_client.lrange(keys.recent_plays("u0"), 0, -1)] == u0_plays[::-1][:3]
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_transient_failure_retries_with_backoff_then_succeeds(redis_client):
    add_events(redis_client, 5)
    sleeps: list[float] = []
    stage = Flaky(updates(redis_client), failures=2)
    stats = consumer(redis_client, stage, sleeps=sleeps).drain(block_ms=10)
    assert stats.applied == 5 and stats.retries == 2 and stats.dead_lettered == 0
    assert len(sleeps) == stats.retries, "one backoff before each retry (its schedule: the test below)"


def test_backoff_is_exponential_capped_and_jittered():
    """The schedule's shape, in units of the base delay: the bound doubles per attempt up to
    the cap (8 bases here), and draws spread over it."""
    rng = random.Random(1)
    draws = [[backoff_delay(a, 1, 8, rng) for _ in range(200)] for a in (1, 2, 3, 6)]
    assert [math.ceil(max(d)) for d in draws] == [1, 2, 4, 8]
    assert len(set(draws[3])) > 100, "jitter spreads retries out"


def test_exhausted_retries_dead_letter_with_reason_attempts_stage_and_payload(redis_client):
    events = add_events(redis_client, 3)
    redis_client.xadd(STREAM, {"e": b"{not json"})
    stats = consumer(redis_client, Flaky(updates(redis_client), failures=99)).drain(block_ms=10)
    assert stats.applied == 0 and stats.dead_lettered == 4
    letters = DeadLetterQueue(redis_client, DLQ).entries()
    by_stage = Counter(d["stage"] for d in letters)
    assert by_stage == {"online_updates": 3, "decode": 1}
    failed = [d for d in letters if d["stage"] == "online_updates"]
    assert all(d["attempts"] == "3" and "TransientError" in d["reason"] for d in failed)
    assert [json.loads(d["record"])["event_id"] for d in failed] == [e["event_id"] for e in events]
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0, "dead-lettered entries are acknowledged"


def test_replay_applies_each_dead_letter_once_filtered_by_stage(redis_server, redis_client, tmp_path):
    from jobs.replay_dlq import replay_dead_letters

    prefix = "rp"
    settings = settings_from_args({
        "redis": {"url": redis_server.url, "stream_key": STREAM, "dead_letter_key": DLQ, "key_prefix": prefix},
        "paths": {"state_dir": str(tmp_path)},
    })
    events = add_events(redis_client, 6)
    redis_client.xadd(STREAM, {"e": b"garbage"})
    consumer(redis_client, Flaky(updates(redis_client, Keys(prefix)), failures=99)).drain(block_ms=10)
    dry = replay_dead_letters(settings, stage="online_updates", dry_run=True)
    assert dry["matched"] == 6 and dry["replayed"] == 0
    first = replay_dead_letters(settings, stage="online_updates")
    again = replay_dead_letters(settings)
    assert first["replayed"] == 6 and again["replayed"] == 0 and again["skipped"] == 1
    assert counters(redis_client, Keys(prefix), {e["track_id"] for e in events}) == expected_counters(events)
    assert [d["stage"] for d in DeadLetterQueue(redis_client, DLQ).entries()] == ["decode"]


class Hang:
    """A stage that never returns: its consumer is mid-batch when it is killed."""

    name = "online_updates"

    def apply(self, entries):
        time.sleep(3600)


def _hanging_stage(client, settings):
    return Hang()


@pytest.mark.ray
def test_consumer_killed_mid_batch_its_entries_are_claimed_and_counted_once(ray_cluster, redis_server, redis_client, tmp_path):
    import ray

    from jobs.consume_events import ConsumerActor

    settings = settings_from_args({
        "redis": {"url": redis_server.url, "stream_key": STREAM, "dead_letter_key": DLQ, "key_prefix": "kc"},
        "paths": {"state_dir": str(tmp_path)},
        "consumer": {"batch_size": 25, "claim_idle_ms": 300, "block_ms": 50},
    })
    events = add_events(redis_client, 60)
    doomed = ConsumerActor.remote(settings, "doomed", _hanging_stage)
    ray.get(doomed.__ray_ready__.remote())  # its group exists
    doomed.poll.remote()  # reads 25 entries, then hangs applying them
    if poll(lambda: redis_client.xpending(STREAM, GROUP)["pending"], lambda n: n >= 25, 1_000_000) < 25:
        pytest.fail("the doomed consumer never read its batch")
    ray.kill(doomed)

    survivor = ConsumerActor.remote(settings, "survivor")
    # Until the dead consumer's entries have been idle past claim_idle_ms, as Redis counts it.
    least_idle = lambda: min(e["time_since_delivered"] for e in redis_client.xpending_range(STREAM, GROUP, "-", "+", 100))  # noqa: E731
    poll(least_idle, lambda ms: ms > settings.consumer.claim_idle_ms, 1_000_000)
    stats = ray.get(survivor.drain.remote(idle_polls=3, block_ms=100))
    stats_again = ray.get(survivor.drain.remote(idle_polls=2, block_ms=100))
    assert stats["claimed"] >= 25 and stats["dead_lettered"] == 0
    assert stats_again["applied"] == stats["applied"] == 60
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0
    assert counters(redis_client, Keys("kc"), {e["track_id"] for e in events}) == expected_counters(events)
    ray.kill(survivor)


def test_permanent_failure_dead_letters_only_the_bad_entry_without_retrying(redis_client):
    keys = Keys("t")
    events = add_events(redis_client, 8)
    redis_client.set(keys.track_counters("t2"), "not a hash")  # WRONGTYPE for events on t2
    sleeps: list[float] = []
    stats = consumer(redis_client, updates(redis_client), sleeps=sleeps).drain(block_ms=10)
    bad = [e for e in events if e["track_id"] == "t2"]
    assert stats.dead_lettered == len(bad) and stats.applied == len(events) - len(bad) and sleeps == []
    letters = DeadLetterQueue(redis_client, DLQ).entries()
    assert sorted(json.loads(d["record"])["event_id"] for d in letters) == sorted(e["event_id"] for e in bad)
    assert all("WRONGTYPE" in d["reason"] and d["attempts"] == "1" for d in letters)
    good = [e for e in events if e["track_id"] != "t2"]
    assert counters(redis_client, keys, {e["track_id"] for e in good}) == expected_counters(good)
