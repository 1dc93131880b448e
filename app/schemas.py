"""Wire schemas: listening events in, recommendations out.

Validation happens here, at the boundary, so that a bad request is answered with the exact
field that is wrong (FastAPI turns a pydantic error into a 422 with its `loc`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]

INT64_MAX = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
"""A non-negative integer that fits the Parquet export's int64 columns: a larger one would be
accepted here and then fail every export run (jobs/export_events.py)."""


class EventType(str, Enum):
    play = "play"
    skip = "skip"
    like = "like"
    dislike = "dislike"
    pause = "pause"
    resume = "resume"
    impression = "impression"
    click = "click"


def parse_timestamp(value: Any) -> datetime:
    """ISO 8601 (with or without zone; naive means UTC) or epoch milliseconds."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO 8601 or epoch milliseconds")
    try:
        return _parse_timestamp(value)
    except (OverflowError, OSError):  # pydantic reports only ValueError as the field's error
        raise ValueError("timestamp out of range (years 1 to 9999 in UTC)") from None


def _parse_timestamp(value: Any) -> datetime:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000.0, tz=timezone.utc)
    if isinstance(value, datetime):
        ts = value
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("timestamp must be ISO 8601 or epoch milliseconds") from None
    else:
        raise ValueError("timestamp must be ISO 8601 or epoch milliseconds")
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


class Event(BaseModel):
    """One listening event as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID
    user_id: Id
    track_id: Id
    event_type: EventType
    timestamp: datetime
    position: Count | None = None
    recommendation_id: str | None = Field(None, max_length=128)
    experiment: str | None = Field(None, max_length=128)
    variant: str | None = Field(None, max_length=128)
    playlist_id: str | None = Field(None, max_length=128)
    duration_ms: Count | None = None
    session_id: str | None = Field(None, max_length=128)
    device_type: str | None = Field(None, max_length=32)
    locale: str | None = Field(None, max_length=35)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> datetime:
        return parse_timestamp(value)


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)


class EventStatus(str, Enum):
    accepted = "accepted"
    duplicate = "duplicate"
    rejected = "rejected"


class EventResult(BaseModel):
    event_id: uuid.UUID
    status: EventStatus
    reason: str | None = None
    """Why an event was rejected (e.g. its event_id was already used for a different event)."""


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int = 0
    results: list[EventResult]


class RecommendedTrack(BaseModel):
    track_id: str
    score: float
    sources: list[str]
    """Which candidate sources proposed the track (cf, content, trending, popular)."""
    artist_id: str | None = None
    genre: str | None = None


class RecommendationResponse(BaseModel):
    user_id: str
    request_id: str
    cold_start: bool
    """True when the user is unknown to the models and the list is popularity-based."""
    items: list[RecommendedTrack]
    model_versions: dict[str, str]
    degraded: bool = False
    """True when a fallback answered (e.g. the feature store was unreachable)."""
    segment: str | None = None
    """The listener segment (new, casual, heavy) whose blend weights were used."""
    experiment: str | None = None
    """The experiment this user is in for this request (None: not in one, the defaults)."""
    variant: str | None = None
    """The variant of `experiment` whose serving parameters produced this list."""
