"""`echotune`: small operator commands that need no Ray.

    echotune config check [--config ray_config.yaml]   # validate the settings, name bad keys
    echotune world generate                            # write the simulated world to state_dir
    echotune redis start | stop                        # the embedded redis-server, by hand
    echotune redis migrate-keys                        # rename keys of an older EchoTune (app/keys.py)
    echotune keys create --scope ingest [--scope read] [--name NAME]   # prints the key once
    echotune keys revoke KEY_ID
    echotune keys list                                 # ids, scopes, names; never the keys
    echotune push keys [--rotate]                      # VAPID key pair for web push; prints the public key
    echotune features validate | list | describe NAME  # the feature registry (feature_repo/)
    echotune experiments create --file F | start NAME | stop NAME | kill NAME VARIANT | list
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.config import ConfigError, load_settings
from app.experiments import cli as experiments_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echotune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ray_config.yaml")
    sub = parser.add_subparsers(dest="group", required=True)
    sub.add_parser("config").add_argument("action", choices=["check"])
    sub.add_parser("world").add_argument("action", choices=["generate"])
    sub.add_parser("redis").add_argument("action", choices=["start", "stop", "migrate-keys"])
    features = sub.add_parser("features", help="feature registry (feature_repo/*.yaml)")
    features.add_argument("action", choices=["validate", "list", "describe"])
    features.add_argument("name", nargs="?", help="describe: the view name")
    experiments_cli.add_parser(sub)
    keys = sub.add_parser("keys", help="API keys (stored as salted hashes in Redis)")
    keys.add_argument("action", choices=["create", "revoke", "list"])
    keys.add_argument("key_id", nargs="?", help="revoke: the key id (the part after etk_, before the next _)")
    keys.add_argument("--scope", action="append", choices=["ingest", "read", "admin"], help="repeat for several scopes")
    keys.add_argument("--name", default="", help="a label for whom the key is for")
    push = sub.add_parser("push", help="web push: the VAPID key pair")
    push.add_argument("action", choices=["keys"])
    push.add_argument("--rotate", action="store_true", help="replace an existing key (every subscription must then be renewed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    if args.group == "config":
        print(f"{args.config}: OK")
    elif args.group == "world":
        from app.data.world import generate_world

        paths = generate_world(settings.world, settings.paths.world_dir)
        print(f"world written to {paths.root}")
    elif args.group == "keys":
        return _keys(parser, args, settings)
    elif args.group == "push":
        from app.push.vapid import ensure_vapid_keys, vapid_key_path

        vapid = ensure_vapid_keys(vapid_key_path(settings), rotate=args.rotate)
        print(f"{'created' if vapid.created else 'existing'} VAPID key: {vapid.private_key_path}", file=sys.stderr)
        print(vapid.public_key)  # the applicationServerKey; stdout alone, for scripts
    elif args.group == "experiments":
        return experiments_cli.run(parser, args, settings)
    elif args.group == "features":
        from app.features.cli import features_command

        return features_command(args.action, args.name, settings)
    elif args.group == "redis" and args.action == "start":
        from app.redis_server import EmbeddedRedis, registered_server

        running = registered_server(settings.paths.redis_dir)
        if running:
            print(f"already running: {running['url']}")
            return 0
        server = EmbeddedRedis(settings.paths.redis_dir, appendonly=settings.redis.appendonly, appendfsync=settings.redis.appendfsync).start()
        server.register()
        print(server.url)
    elif args.group == "redis" and args.action == "migrate-keys":
        from app.keys import Keys
        from app.redis_server import connect, migrate_legacy_keys

        print(f"migrated {migrate_legacy_keys(connect(settings), Keys(settings.redis.key_prefix), settings.gateway.dedup_window_s)} keys")
    else:
        from app.redis_server import stop_registered

        print("stopped" if stop_registered(settings.paths.redis_dir) else "no embedded redis running")
    return 0


def _keys(parser: argparse.ArgumentParser, args: argparse.Namespace, settings) -> int:
    from app.events.auth import ApiKeyStore, split_token
    from app.keys import Keys
    from app.redis_server import connect

    store = ApiKeyStore(connect(settings), Keys(settings.redis.key_prefix))
    if args.action == "create":
        if not args.scope:
            parser.error("keys create needs at least one --scope")
        created = store.create(args.scope, name=args.name)
        print(f"key_id: {created.key_id}\nscopes: {','.join(sorted(created.scopes))}", file=sys.stderr)
        print(created.token)  # the only time the key is shown; stdout alone, for scripts
    elif args.action == "revoke":
        if not args.key_id:
            parser.error("keys revoke needs KEY_ID")
        parts = split_token(args.key_id)  # a whole key works too
        args.key_id = parts[0] if parts else args.key_id
        if not store.revoke(args.key_id):
            print(f"no API key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    else:
        for row in store.list():
            state = "revoked" if row["revoked_at_ms"] else "active"
            print(f"{row['key_id']}  {row['scopes']:<20} {state:<8} {row['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
