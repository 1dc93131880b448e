"""Waiting on state, never on a clock: a test reads what it needs until it holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(read: Callable[[], T], until: Callable[[T], bool], attempts: int) -> T:
    """`read()` until `until` holds for its value, at most `attempts` times; the last value
    either way, for the caller's assertion to name. The bound keeps a wait that never ends
    from hanging the suite without timing anything."""
    value = read()
    for _ in range(attempts - 1):
        if until(value):
            break
        value = read()
    return value
