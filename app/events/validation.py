"""Turn a raw POST body into validated events, or say exactly which field is wrong.

The body is either one event object or `{"events": [...]}`. Parsing is all-or-nothing: if
any event is malformed the request is rejected and nothing is stored, so a client never has
to work out which half of a batch landed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from app.config import GatewaySettings
from app.schemas import Event, EventBatch


class EventValidationError(ValueError):
    """Carries FastAPI-style error details: a list of {loc, msg, type}."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def _details(exc: ValidationError, prefix: tuple) -> list[dict[str, Any]]:
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def parse_events(body: Any, settings: GatewaySettings, now: datetime) -> list[Event]:
    if isinstance(body, dict) and "events" in body:
        if isinstance(body["events"], list) and len(body["events"]) > settings.max_batch:
            raise EventValidationError(
                [{"loc": ["body", "events"], "msg": f"at most {settings.max_batch} events per request", "type": "too_long"}]
            )
        try:
            events = EventBatch.model_validate(body).events
        except ValidationError as exc:
            raise EventValidationError(_details(exc, ("body",))) from None
        prefix: tuple = ("body", "events")
    else:
        try:
            events = [Event.model_validate(body)]
        except ValidationError as exc:
            raise EventValidationError(_details(exc, ("body",))) from None
        prefix = ("body",)

    errors = []
    latest = now + timedelta(seconds=settings.max_future_s)
    earliest = now - timedelta(days=settings.max_age_days)
    for i, event in enumerate(events):
        loc = [*prefix, i, "timestamp"] if len(prefix) == 2 else [*prefix, "timestamp"]
        if event.timestamp > latest:
            errors.append({"loc": loc, "msg": f"more than {settings.max_future_s:.0f}s in the future", "type": "value_error"})
        elif event.timestamp < earliest:
            errors.append({"loc": loc, "msg": f"older than {settings.max_age_days:g} days", "type": "value_error"})
    if errors:
        raise EventValidationError(errors)
    return events
