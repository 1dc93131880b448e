"""`echotune features validate | list | describe NAME`: the feature registry from a shell."""

from __future__ import annotations

from app.config import Settings
from app.features.offline import OfflineSnapshots
from app.features.registry import RegistryError, check_compatible, load_registry


def features_command(action: str, name: str | None, settings: Settings) -> int:
    try:
        registry = load_registry(settings.features.repo_dir)
    except RegistryError as exc:
        print(f"invalid feature repo: {exc}")
        return 2
    if action == "validate":
        published = OfflineSnapshots(settings.paths.features_dir).published_registry()
        problems = check_compatible(published, registry) if published else []
        for problem in problems:
            print(f"incompatible: {problem}")
        if problems:
            return 2
        print(f"{settings.features.repo_dir}: {len(registry.views)} views OK" + ("" if published else " (nothing published yet)"))
    elif action == "list":
        for view in registry.views.values():
            print(f"{view.name:<16} v{view.version}  entity={view.entity:<6} fields={len(view.fields):<3} {view.description}")
    else:
        if not name:
            print("describe needs a view name")
            return 2
        try:
            view = registry[name]
        except RegistryError as exc:
            print(exc)
            return 2
        print(f"{view.name} v{view.version} (entity {view.entity}, ttl {view.ttl_s}s)\n  source: {view.source}\n  {view.description}")
        for field, spec in view.fields.items():
            print(f"  {field:<16} {spec.type:<15} {spec.description}")
    return 0
