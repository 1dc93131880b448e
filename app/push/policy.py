"""When a listener may be notified: quiet hours in their own time zone and frequency caps.

Pure functions of the clock, so the rules are tested without waiting for night to fall.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo


def in_quiet_hours(now_utc: datetime, timezone: str, start_hour: int, end_hour: int) -> bool:
    """Whether the listener's local time is in [start, end); the span may cross midnight."""
    if start_hour == end_hour:
        return False
    hour = now_utc.astimezone(ZoneInfo(timezone)).hour
    if start_hour < end_hour:
        return start_hour <= hour < end_hour
    return hour >= start_hour or hour < end_hour


def cap_reason(sent_ms: list[int], now_ms: int, max_per_day: int, min_interval_s: int) -> str | None:
    """Why the frequency cap forbids a notification now, or None. `sent_ms`: earlier sends."""
    recent = [t for t in sent_ms if now_ms - t < 24 * 3600 * 1000]
    if len(recent) >= max_per_day:
        return f"{len(recent)} notifications in the last 24 h (cap {max_per_day})"
    if recent and now_ms - max(recent) < min_interval_s * 1000:
        return f"last notification less than {min_interval_s} s ago"
    return None
