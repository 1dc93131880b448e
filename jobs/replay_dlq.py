"""Replay dead letters of the event consumer through its stage again.

    python -m jobs.replay_dlq --config ray_config.yaml                       # every replayable one
    python -m jobs.replay_dlq --config ray_config.yaml --stage online_updates
    python -m jobs.replay_dlq --config ray_config.yaml --reason ConnectionError --dry-run

A replay deletes the dead letter and applies the event in one atomic step, so replaying twice
(or two replays at once) applies each event once. Dead letters whose payload is still not a
usable event (stage `decode`, `export`, other jobs' records) are left where they are and
counted as `skipped`.
"""

from __future__ import annotations

import logging

from app.config import Settings
from app.events.consumer import replayable_event
from app.events.dead_letter import DeadLetterQueue
from app.redis_server import connect
from jobs.consume_events import online_updates

log = logging.getLogger(__name__)


def replay_dead_letters(settings: Settings, reason: str | None = None, stage: str | None = None, dry_run: bool = False) -> dict:
    client = connect(settings)
    dlq = DeadLetterQueue(client, settings.redis.dead_letter_key)
    updates = online_updates(client, settings)
    matched = replayed = skipped = 0
    after = "-"
    while True:
        rows = client.xrange(dlq.key, min=after, max="+", count=1000)
        if not rows:
            break
        after = "(" + rows[-1][0].decode()
        for raw_id, raw in rows:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            if stage and fields.get("stage") != stage or reason and reason not in fields.get("reason", ""):
                continue
            matched += 1
            event = replayable_event(fields.get("record", "")) if fields.get("source") == "consume_events" else None
            if event is None:
                skipped += 1
            elif not dry_run:
                result = updates.apply_dead_letter(dlq.key, raw_id.decode(), event)
                replayed += result.count
                skipped += len(result.rejected)  # still cannot be applied: stays dead-lettered
    log.info("dead letters matched %d, replayed %d, skipped %d", matched, replayed, skipped)
    return {"job": "replay_dlq", "matched": matched, "replayed": replayed, "skipped": skipped, "dry_run": dry_run, "remaining": len(dlq)}


def main() -> None:
    from jobs.common import parse_args, print_summary

    def extra(p):
        p.add_argument("--reason", help="only dead letters whose reason contains this text")
        p.add_argument("--stage", help="only dead letters of this stage (online_updates, claim, decode, export)")
        p.add_argument("--dry-run", action="store_true", help="count what would be replayed, change nothing")

    args, settings = parse_args(__doc__, extra)
    print_summary(replay_dead_letters(settings, args.reason, args.stage, args.dry_run))


if __name__ == "__main__":
    main()
