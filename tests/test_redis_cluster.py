"""EchoTune on a real 3-master Redis Cluster on loopback: `redis+cluster://` gets redis-py's
cluster client; the online store (its whole contract suite), the rate limiter and every
multi-key atomic operation (Lua scripts, MULTI, RENAME swaps) work because their keys share a
hash slot, while plain reads still spread over the nodes.

    .venv/bin/pytest tests/test_redis_cluster.py
"""

from __future__ import annotations

import hashlib
import inspect

import pandas as pd
import pytest
import redis
from fastapi import HTTPException
from redis.cluster import RedisCluster
from redis.crc import key_slot

from app.config import AuthSettings, ConfigError, GatewaySettings, RateLimitSettings, ScopeLimit, settings_from_args
from app.events.auth import build_guard
from app.events.consumer import OnlineUpdates, StreamConsumer
from app.events.dead_letter import DeadLetterQueue
from app.events.rate_limit import TokenBucketLimiter
from app.events.stream import AppendStatus, EventStream
from app.events.validation import parse_events
from app.experiments.registry import ExperimentRegistry
from app.features.store import LiveRead, Published, RedisOnlineStore
from app.keys import Keys
from app.push.subscriptions import SubscriptionRequest, SubscriptionStore
from app.redis_server import EmbeddedRedisCluster, connect, migrate_legacy_keys
from app.trending.lists import TrendingLists
from tests import test_online_store as contract
from tests.test_events import NOW, event, pending
from tests.test_experiments import experiment
from tests.test_push import subscription_body

REGISTRY, USER, TRACK = contract.REGISTRY, contract.USER, contract.TRACK
PREFIX = "ct"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = EmbeddedRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(cluster, tmp_path_factory):
    return settings_from_args({
        "redis": {"url": cluster.url, "key_prefix": PREFIX, "stream_key": f"{PREFIX}:{{events}}", "dead_letter_key": f"{PREFIX}:{{events}}:dlq"},
        "paths": {"state_dir": str(tmp_path_factory.mktemp("state"))},
    })


@pytest.fixture
def redis_client(settings):
    """Overrides the single-server fixture: the contract tests below talk to the cluster."""
    client = connect(settings)
    client.flushall()  # every primary
    yield client
    client.close()


@pytest.fixture
def store(redis_client):
    return RedisOnlineStore(redis_client, Keys("test"))


# The online store's contract suite, unchanged, against the cluster (every test taking `store`).
globals().update({
    name: fn for name, fn in vars(contract).items()
    if name.startswith("test_") and "store" in inspect.signature(fn).parameters
})


def node_of(client: RedisCluster, key: str) -> str:
    return client.get_node_from_key(key).name


def test_cluster_url_gets_the_cluster_client_and_untagged_ingest_keys_are_refused(cluster, settings):
    client = connect(settings)
    assert isinstance(client, RedisCluster) and len(client.get_primaries()) == 3
    with pytest.raises(ConfigError, match="stream_key and dead_letter_key must carry the hash tag"):
        settings_from_args({"redis": {"url": cluster.url}})


def test_materialised_namespace_reads_entities_from_every_node_in_one_call_then_swaps(redis_client):
    store = RedisOnlineStore(redis_client, Keys(PREFIX))
    users, tracks = [f"u{i}" for i in range(40)], [f"t{i}" for i in range(40)]
    for ns in ("v1", "v2"):
        store.write(ns, USER, [(u, {"n_plays": i, "recent_tracks": [ns]}) for i, u in enumerate(users)])
        store.write(ns, TRACK, [(t, {"genre": ns}) for t in tracks])
        store.write_ranking(ns, "popular", {t: float(i) for i, t in enumerate(tracks)}, ttl_s=60)
    keys = Keys(PREFIX)
    assert len({node_of(redis_client, keys.feature_hash("v1", USER.key, u)) for u in users}) == 3, "rows spread over the cluster"
    redis_client.lpush(keys.recent_plays("u1"), "t9")

    assert store.publish(Published("v1", REGISTRY, {})) is None
    ns = store.current().namespace
    read = store.read(ns, [(USER, u) for u in users] + [(TRACK, t) for t in tracks], rankings=[("popular", 2)],
                      live=[LiveRead("list", keys.recent_plays("u1"))])
    assert [r["n_plays"] for r in read.rows[:40]] == list(range(40)) and {r["genre"] for r in read.rows[40:]} == {"v1"}
    assert read.rankings == [[("t39", 39.0), ("t38", 38.0)]] and read.live == [["t9"]]

    assert store.publish(Published("v2", REGISTRY, {})) == "v1"
    assert store.read(store.current().namespace, [(USER, "u3")]).rows[0]["recent_tracks"] == ["v2"]
    assert store.expire_namespace("v1", 60) == 81, "SCAN finds the old namespace on every node"


def test_rate_limiter_is_exact_across_calls_and_answers_429(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    key_ids = [hashlib.sha1(str(i).encode()).hexdigest()[:12] for i in range(12)]  # varied, like real key ids
    buckets = [Keys(PREFIX).rate_bucket(key_id, "read") for key_id in key_ids]
    assert len({node_of(redis_client, b) for b in buckets}) == 3
    for bucket in buckets:  # the same script on every node: each bucket is exact on its own
        decisions = [limiter.acquire(bucket, rate_per_s=0.01, burst=3) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True] * 3 + [False] * 2

    guard = build_guard(redis_client, PREFIX, AuthSettings(), RateLimitSettings(read=ScopeLimit(rate_per_s=0.01, burst=2)))
    reader = guard.store.create({"read"}).token
    assert guard.check(reader, "GET", "/v1/trending") and guard.check(reader, "GET", "/v1/trending")
    with pytest.raises(HTTPException) as refused:
        guard.check(reader, "GET", "/v1/trending")
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"].isdigit()


def test_keys_of_each_multi_key_operation_share_one_slot(settings):
    keys, stream, dlq = Keys(PREFIX), settings.redis.stream_key, settings.redis.dead_letter_key
    trending = TrendingLists(None, PREFIX)
    groups = {
        "ingest scripts": [stream, dlq, keys.dedup() + "e1", keys.session_state() + "u1", keys.recent_plays("u1"), keys.track_counters("t1")],
        "export commit": [keys.export_lock(), keys.export_cursor(), keys.export_inflight()],
        "trending swap": [trending._list("global"), trending._detail("genre:rock"), trending._names, trending._meta, f"{trending.base}:tmp:v9:list:x"],
        "push add": [keys.push_subscriptions("u}1"), keys.push_profile("u}1")],
        "dead letters once": [dlq, DeadLetterQueue(None, dlq).seen_key("train_cf")],
    }
    for name, members in groups.items():
        assert len({key_slot(k.encode()) for k in members}) == 1, name


def test_ingest_append_consume_dead_letter_and_export_run_on_the_cluster(redis_client, settings):
    from jobs.export_events import export_events

    stream = EventStream.from_settings(redis_client, settings)
    events = parse_events({"events": [event(user_id=f"u{i % 4}", track_id=f"t{i % 3}") for i in range(12)]}, GatewaySettings(), NOW)
    assert {r.status for r in stream.append(pending(events))} == {AppendStatus.accepted}
    assert {r.status for r in stream.append(pending(events[:3], 2))} == {AppendStatus.duplicate}
    redis_client.xadd(settings.redis.stream_key, {"e": b"{not json"})

    keys = Keys(PREFIX)
    stage = OnlineUpdates(redis_client, keys, settings.redis.stream_key, settings.consumer.group, keep=5)
    consumer = StreamConsumer(redis_client, settings.redis.stream_key, settings.consumer, "c1", stage,
                              DeadLetterQueue(redis_client, settings.redis.dead_letter_key))
    consumer.ensure_group()
    stats = consumer.drain(block_ms=10)
    assert stats.applied == 12 and stats.dead_lettered == 1
    plays = sum(int(redis_client.hget(keys.track_counters(f"t{i}"), "play") or 0) for i in range(3))
    assert plays == 12 and redis_client.llen(keys.recent_plays("u0")) == 3

    dlq = DeadLetterQueue(redis_client, settings.redis.dead_letter_key)
    assert [dlq.put_many("train_cf", [({"user_id": None}, "no_user_or_track_id")], once=True) for _ in range(2)] == [1, 0]

    summary = export_events(settings)
    assert summary["exported"] == 12 and summary["dead_lettered"] == 1 and summary["stream_length"] == 0
    assert redis_client.hgetall(keys.export_inflight()) == {}


def test_trending_swap_experiment_start_and_push_add_run_on_the_cluster(redis_client):
    lists = TrendingLists(redis_client, PREFIX)
    frame = pd.DataFrame({"track_id": ["a", "b"], "rank_score": [2.0, 1.0], "genre": ["rock", "jazz"]})
    lists.publish("v1", {"global": frame, "genre:rock": frame[:1]}, ttl_s=60)
    lists.publish("v2", {"global": frame[::-1].assign(rank_score=[3.0, 0.5])}, ttl_s=60)
    assert lists.names() == ["global"] and lists.version() == "v2"
    assert [t["track_id"] for t in lists.top("global", 2)] == ["b", "a"] and lists.top("genre:rock", 2) == []

    registry = ExperimentRegistry(redis_client, Keys(PREFIX))
    registry.create(experiment("mmr", traffic=0.5))
    assert registry.start("mmr").buckets == (0, 500)

    subs = SubscriptionStore(redis_client, Keys(PREFIX))
    subs.add(SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/d1", user="u7", genres=["rock"])))
    assert subs.users() == ["u7"] and subs.profile("u7")["genres"] == ["rock"]
    assert [r["subscription"]["endpoint"] for _, r in subs.subscriptions("u7")] == ["https://fcm.googleapis.com/d1"]


def test_a_single_server_from_before_the_tagged_layout_keeps_its_data(redis_server):
    """Upgrading in place (`make demo` on old state, or `echotune redis migrate-keys`): push
    subscriptions, online counters, sessions and the export cursor move to their new names."""
    client = redis.Redis.from_url(redis_server.url)
    keys, p = Keys("mig"), "mig"
    client.hset(f"{p}:push:subs:u1", "d1", "{}")
    client.hset(f"{p}:online:track:t1", "play", 3)
    (old,) = parse_events(event(), GatewaySettings(), NOW)
    (reused,) = parse_events(event(event_id=str(old.event_id), track_id="t2"), GatewaySettings(), NOW)
    (old_pending,) = pending([old])
    # an older EchoTune kept one key per event holding the whole sha1 in hex; its first 8
    # bytes are today's fingerprint
    client.set(f"{p}:seen-event:{old.event_id}", old_pending.fingerprint.hex() + "0" * 24, ex=600)
    # and before fingerprints, just "1": seen, content unknown (the demo's own state had 22,466)
    (older,) = parse_events(event(), GatewaySettings(), NOW)
    client.set(f"{p}:{{events}}:seen-event:{older.event_id}", "1", ex=600)
    client.set(f"{p}:export:cursor", "5-0")
    client.set(keys.push_profile("u2"), "already new")
    client.set(f"{p}:push:profile:u2", "stale old")
    assert migrate_legacy_keys(client, keys, dedup_window_s=600) == 5
    assert client.hgetall(keys.push_subscriptions("u1")) == {b"d1": b"{}"} and client.hget(keys.track_counters("t1"), "play") == b"3"
    assert client.get(keys.export_cursor()) == b"5-0"
    stream = EventStream(client, f"{p}:stream", keys.dedup(), dedup_window_s=600)
    assert [r.status for r in stream.append(pending([old, reused, older]))] == [
        AppendStatus.duplicate, AppendStatus.conflict, AppendStatus.duplicate,
    ], "accepted before the upgrade, still known"
    assert client.get(keys.push_profile("u2")) == b"already new", "never overwrites what new code wrote"
    assert migrate_legacy_keys(client, keys, dedup_window_s=600) == 0
