"""What the server adds to an event: device type, locale, receive time, schema version, and
the idempotency fingerprint. Pure functions; sessionisation, which needs per-user state, runs
inside the stream's append script (`app/events/stream.py`) so that it is atomic with the
duplicate check: a retried event never moves a user's session.

    enriched = enrich(event, RequestContext.from_headers(ua, accept_language, received_at_ms))
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field

from app.schemas import SCHEMA_VERSION, Event

DEVICE_TYPES = ("mobile", "tablet", "desktop", "tv", "bot")

# Order matters: bots and TVs often also claim to be desktop or Android browsers.
_BOT = re.compile(r"bot\b|bot/|crawl|spider|slurp|curl/|wget/|python-|httpx|okhttp|java/|go-http|headless|monitor", re.I)
# Amazon Fire TV models announce themselves as AFTB, AFTMM, AFTKA, AFTSSS, AFTHA001, ...: matched
# case-sensitively as a whole word, so "after" or "crafts" in a User-Agent is not a TV.
_TV = re.compile(r"smart-?tv|googletv|google tv|appletv|apple ?tv|hbbtv|roku|tizen|web0?s|netcast|crkey|(?-i:\bAFT[A-Z][A-Z0-9]{0,9}\b)|bravia|\btv\b", re.I)
_TABLET = re.compile(r"ipad|tablet|kindle|silk/|playbook|nexus (7|9|10)\b|sm-t\d", re.I)
_MOBILE = re.compile(r"mobi|iphone|ipod|windows phone|blackberry|bb10|opera mini|android", re.I)
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


@functools.lru_cache(maxsize=4096)
def device_type(user_agent: str | None) -> str | None:
    """mobile, tablet, desktop, tv or bot; None when there is no User-Agent to go on. Cached:
    a service sees few distinct User-Agents, each in many requests."""
    if not user_agent or not user_agent.strip():
        return None
    if _BOT.search(user_agent):
        return "bot"
    if _TV.search(user_agent):
        return "tv"
    # Android tablets omit "Mobile"; Android phones include it.
    if _TABLET.search(user_agent) or ("android" in user_agent.lower() and "mobile" not in user_agent.lower()):
        return "tablet"
    if _MOBILE.search(user_agent):
        return "mobile"
    return "desktop"


def normalise_locale(tag: str) -> str | None:
    """`en_us` / `EN-us` -> `en-US`, `ZH-HANT-tw` -> `zh-Hant-TW`; None for anything that is not
    a language tag. The case is BCP 47's canonical one (RFC 5646 2.1.1: language lower, script
    title, region upper, the rest lower), so one locale is never counted as several."""
    tag = tag.strip().replace("_", "-")
    if not _LOCALE.match(tag) or len(tag) > 35:
        return None
    lang, *rest = tag.split("-")
    # _LOCALE admits no singleton (-u-, -x-), so a 4-letter subtag is a script, a 2-letter one a region.
    return "-".join([lang.lower(), *(p.title() if len(p) == 4 and p.isalpha() else p.upper() if len(p) == 2 else p.lower() for p in rest)])


def preferred_locale(accept_language: str | None) -> str | None:
    """The highest-q language tag of an Accept-Language header (ties: first listed)."""
    if not accept_language:
        return None
    best, best_q = None, 0.0
    for part in accept_language.split(","):
        tag, _, params = part.strip().partition(";")
        q: float | None = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                q = _quality(value)
        if q is None:  # a malformed weight (q=inf, q=1.5, q=abc): the entry says nothing usable
            continue
        locale = normalise_locale(tag) if tag.strip() != "*" else None
        if locale and q > best_q:
            best, best_q = locale, q
    return best


def _quality(value: str) -> float | None:
    """An Accept-Language weight, or None unless it is a number from 0 to 1 (RFC 9110 12.4.2)."""
    try:
        q = float(value)
    except ValueError:
        return None
    return q if 0.0 <= q <= 1.0 else None  # NaN fails both comparisons


@dataclass(frozen=True)
class RequestContext:
    """What the server knows about the request an event came in."""

    received_at_ms: int
    device_type: str | None = None
    locale: str | None = None
    extra_json: str = field(init=False, repr=False, compare=False)
    """The server-added fields as the tail of a JSON object (`,"received_at_ms":...}`), for
    the events that bring no device type or locale of their own: built once per request."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_json", _extra_json(self.received_at_ms, self.device_type, self.locale))

    @classmethod
    def from_headers(cls, user_agent: str | None, accept_language: str | None, received_at_ms: int) -> "RequestContext":
        return cls(received_at_ms=received_at_ms, device_type=device_type(user_agent), locale=preferred_locale(accept_language))


# Client fields that describe where an event was sent from rather than what happened: a retry
# from another device is the same event, and the server sets or normalises these itself.
_CONTEXT_FIELDS = ("session_id", "device_type", "locale")


_CORE_FIELDS = ("event_id", "user_id", "track_id", "event_type", "timestamp")
_OPTIONAL_FIELDS = tuple(f for f in Event.model_fields if f not in _CORE_FIELDS and f not in _CONTEXT_FIELDS)


@dataclass(frozen=True)
class Enriched:
    fingerprint: bytes
    """The first 8 bytes of the sha1 of what the client said happened, so a retry (same id,
    same content) is a duplicate and a reused id with different content is rejected, not
    silently dropped. 64 bits keep the dedup marker small; a reused id slips through as a
    duplicate only on a 2^-64 collision."""
    document: dict
    """The stored document, minus `session_id` (added atomically at append)."""
    json: str
    """`document` as compact JSON (built once: it is on the ingestion hot path)."""


_compact_json = json.JSONEncoder(separators=(",", ":")).encode
"""json.dumps(..., separators=(",", ":")) without building an encoder per call; the same bytes."""


def _extra(received_at_ms: int, device: str | None, locale: str | None) -> dict:
    extra: dict = {"received_at_ms": received_at_ms, "schema_version": SCHEMA_VERSION}
    if device:
        extra["device_type"] = device
    if locale:
        extra["locale"] = locale
    return extra


def _extra_json(received_at_ms: int, device: str | None, locale: str | None) -> str:
    return "," + _compact_json(_extra(received_at_ms, device, locale))[1:]


def enrich(event: Event, ctx: RequestContext) -> Enriched:
    # Built field by field rather than with model_dump: every optional field is a str or int,
    # and this runs for each of 10,000+ events a second.
    doc = {
        "event_id": str(event.event_id),
        "user_id": event.user_id,
        "track_id": event.track_id,
        "event_type": event.event_type.value,
        "timestamp": round(event.timestamp.timestamp() * 1000),  # epoch ms: the Parquet unit
    }
    for name in _OPTIONAL_FIELDS:
        value = getattr(event, name)
        if value is not None:
            doc[name] = value
    core = _compact_json(doc)
    device = event.device_type if event.device_type in DEVICE_TYPES else ctx.device_type
    locale = (normalise_locale(event.locale) if event.locale else None) or ctx.locale
    doc.update(_extra(ctx.received_at_ms, device, locale))
    if device == ctx.device_type and locale == ctx.locale:
        tail = ctx.extra_json  # the common case: the request's own context
    else:
        tail = _extra_json(ctx.received_at_ms, device, locale)
    return Enriched(fingerprint=hashlib.sha1(core.encode()).digest()[:8], document=doc, json=core[:-1] + tail)
