""""New trending in your genres" web-push notifications, one pass over every subscriber.

    python -m jobs.notify --config ray_config.yaml
    ray job submit --working-dir . -- python -m jobs.notify --config ray_config.yaml

Run it after `jobs.trending` publishes (or on a schedule): per listener it respects quiet
hours in their time zone and the frequency caps under `push`, tells each listener about a
trending track once, and prunes subscriptions whose push service answers 404 or 410. Payloads
are encrypted to each subscription's keys (RFC 8291, aes128gcm) and signed with the VAPID key
that `echotune push keys` created. No Ray needed: the work is a few HTTP requests per user.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

from app.config import Settings
from app.keys import Keys
from app.push.notifier import NotifyReport, TrendNotifier
from app.push.sender import WebPushSender
from app.push.subscriptions import SubscriptionStore
from app.push.vapid import load_vapid_keys, vapid_key_path
from app.redis_server import connect
from app.trending.lists import TrendingLists, list_name


def notify(settings: Settings, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> NotifyReport:
    path = vapid_key_path(settings)
    if load_vapid_keys(path) is None:
        raise SystemExit(f"no VAPID key at {path}: run `echotune push keys` first")
    client = connect(settings)
    push = settings.push
    lists = TrendingLists(client, settings.redis.key_prefix)
    return TrendNotifier(
        SubscriptionStore(client, Keys(settings.redis.key_prefix), push.max_subscriptions_per_user),
        trending_top=lambda genre, k: lists.top(list_name(genre=genre), k),
        send=WebPushSender(path, push.vapid_subject, push.message_ttl_s, push.request_timeout_s),
        settings=push,
        clock=clock,
    ).run()


def main() -> None:
    from jobs.common import parse_args, print_summary

    _, settings = parse_args(__doc__)
    print_summary(notify(settings).as_dict())


if __name__ == "__main__":
    main()
