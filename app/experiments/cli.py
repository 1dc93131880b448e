"""`echotune experiments ...`: definitions and kill switches in Redis, for operators.

    echotune experiments create --file exp.yaml     # a YAML/JSON Experiment (see definitions.py)
    echotune experiments start NAME                 # claim layer traffic, start assigning
    echotune experiments stop NAME                  # kill switch: replicas stop within seconds
    echotune experiments kill NAME VARIANT          # roll one variant back by hand
    echotune experiments list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from app.experiments.definitions import Experiment
from app.experiments.registry import ExperimentError, ExperimentRegistry


def add_parser(sub) -> None:
    p = sub.add_parser("experiments", help="online experiments (definitions and kill switches in Redis)")
    p.add_argument("action", choices=["create", "start", "stop", "kill", "list"])
    p.add_argument("name", nargs="?", help="start/stop/kill: the experiment")
    p.add_argument("variant", nargs="?", help="kill: the variant to roll back")
    p.add_argument("--file", type=Path, help="create: YAML or JSON definition")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, settings) -> int:
    from app.keys import Keys
    from app.redis_server import connect

    registry = ExperimentRegistry(connect(settings), Keys(settings.redis.key_prefix))
    try:
        if args.action == "create":
            if not args.file:
                parser.error("experiments create needs --file")
            try:
                exp = Experiment.model_validate(yaml.safe_load(args.file.read_text()))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                print(f"invalid experiment definition: {problems}", file=sys.stderr)
                return 2
            print(f"created {registry.create(exp).name} (draft)")
        elif args.action == "list":
            killed = registry.killed()
            for e in registry.list():
                variants = ", ".join(f"{v.name}:{v.weight:g}{' (killed)' if f'{e.name}/{v.name}' in killed else ''}" for v in e.variants)
                print(f"{e.name:<24} {e.status:<8} layer={e.layer} buckets={e.buckets} traffic={e.traffic:.0%}  {variants}")
        else:
            if not args.name:
                parser.error(f"experiments {args.action} needs NAME")
            if args.action == "start":
                e = registry.start(args.name)
                print(f"started {e.name}: layer {e.layer} buckets {e.buckets[0]}..{e.buckets[1]}")
            elif args.action == "stop":
                print(f"stopped {registry.stop(args.name).name}")
            else:
                if not args.variant:
                    parser.error("experiments kill needs NAME VARIANT")
                registry.get(args.name).variant(args.variant)
                registry.kill(args.name, args.variant, "killed by hand from the CLI")
                print(f"killed {args.name}/{args.variant}")
    except (ExperimentError, KeyError) as exc:
        print(str(exc).strip('"'), file=sys.stderr)
        return 1
    return 0
