"""Every Redis key EchoTune uses, in one place, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "echotune"

    def dedup(self) -> str:
        """Prefix of the per-event idempotency markers."""
        return f"{self.prefix}:seen-event:"

    def export_cursor(self) -> str:
        return f"{self.prefix}:export:cursor"

    def feature_alias(self) -> str:
        """Names the feature namespace (materialisation version) readers should use."""
        return f"{self.prefix}:fs:current"

    def feature_hash(self, namespace: str, view: str, entity_id: str) -> str:
        return f"{self.prefix}:fs:{namespace}:{view}:{entity_id}"

    def namespace_pattern(self, namespace: str) -> str:
        """SCAN pattern matching every key of one feature namespace."""
        return f"{self.prefix}:fs:{namespace}:*"

    def ranking(self, namespace: str, name: str) -> str:
        """Sorted set of a ranked list (trending, popular) inside a feature namespace."""
        return f"{self.prefix}:fs:{namespace}:rank:{name}"
