"""`echotune`: small operator commands that need no Ray.

    echotune config check [--config ray_config.yaml]   # validate the settings, name bad keys
    echotune world generate                            # write the simulated world to state_dir
    echotune redis start | stop                        # the embedded redis-server, by hand
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echotune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ray_config.yaml")
    sub = parser.add_subparsers(dest="group", required=True)
    sub.add_parser("config").add_argument("action", choices=["check"])
    sub.add_parser("world").add_argument("action", choices=["generate"])
    sub.add_parser("redis").add_argument("action", choices=["start", "stop"])
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
    elif args.group == "redis" and args.action == "start":
        from app.redis_server import EmbeddedRedis, registered_server

        running = registered_server(settings.paths.redis_dir)
        if running:
            print(f"already running: {running['url']}")
            return 0
        server = EmbeddedRedis(settings.paths.redis_dir, appendonly=settings.redis.appendonly).start()
        server.register()
        print(server.url)
    else:
        from app.redis_server import stop_registered

        print("stopped" if stop_registered(settings.paths.redis_dir) else "no embedded redis running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
