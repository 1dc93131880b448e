"""Run the online-updates consumer group as Ray actors (logic: app/events/consumer.py).

    ray job submit --working-dir . -- python -m jobs.consume_events --config ray_config.yaml          # drain, then exit
    ray job submit --working-dir . -- python -m jobs.consume_events --config ray_config.yaml --follow # run until stopped

Each actor is one named consumer of the group. An actor that dies leaves its delivered but
unacknowledged entries pending; the others claim them after `consumer.claim_idle_ms`.
"""

from __future__ import annotations

import logging
from typing import Callable

import ray

from app.config import Settings
from app.events.consumer import OnlineUpdates, Stage, StreamConsumer
from app.events.dead_letter import DeadLetterQueue
from app.keys import Keys
from app.redis_server import connect

log = logging.getLogger(__name__)


def online_updates(client, settings: Settings) -> Stage:
    return OnlineUpdates(client, Keys(settings.redis.key_prefix), settings.redis.stream_key, settings.consumer.group, settings.consumer.recent_plays)


@ray.remote(num_cpus=0, max_restarts=0)
class ConsumerActor:
    """One consumer of the group. `stage_factory(client, settings)` builds its stage, so a
    test can put a stage in that hangs or fails; by default the online updates."""

    def __init__(self, settings: Settings, name: str, stage_factory: Callable | None = None):
        client = connect(settings)
        stage = (stage_factory or online_updates)(client, settings)
        self.consumer = StreamConsumer(
            client, settings.redis.stream_key, settings.consumer, name, stage, DeadLetterQueue(client, settings.redis.dead_letter_key)
        )
        self.consumer.ensure_group()
        self._stop = False

    def drain(self, idle_polls: int = 2, block_ms: int = 100) -> dict:
        return vars(self.consumer.drain(idle_polls, block_ms))

    def poll(self) -> int:
        return self.consumer.poll()

    def follow(self) -> dict:
        """Poll until `stop()`; a Redis outage is logged and waited out, never fatal."""
        import time

        import redis

        while not self._stop:
            try:
                self.consumer.poll()
            except redis.RedisError as exc:
                log.warning("%s: redis error, pausing: %s", self.consumer.name, exc)
                time.sleep(1.0)
        return vars(self.consumer.stats)

    def stop(self) -> None:
        self._stop = True


def consume_events(settings: Settings, follow: bool = False) -> dict:
    n = settings.consumer.consumers
    # follow() blocks its actor, so a follower needs room for a concurrent stop() call.
    actors = [ConsumerActor.options(max_concurrency=2).remote(settings, f"consumer-{i}") for i in range(n)]
    results = ray.get([a.follow.remote() if follow else a.drain.remote() for a in actors])
    total = {k: sum(r[k] for r in results) for k in ("applied", "dead_lettered", "retries", "claimed")}
    return {"job": "consume_events", "consumers": n, **total}


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    args, settings = parse_args(__doc__, lambda p: p.add_argument("--follow", action="store_true", help="run until stopped"))
    init_ray()
    print_summary(consume_events(settings, follow=args.follow))


if __name__ == "__main__":
    main()
