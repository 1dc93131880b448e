"""Small FastAPI dependencies for the event routes (importable, so Serve's pickling of the app
keeps their annotations resolvable)."""

from __future__ import annotations

from fastapi import Request


async def client_hints(request: Request) -> dict[str, str | None]:
    """The request headers enrichment uses: User-Agent (device type), Accept-Language (locale).
    `async` only so that FastAPI runs it inline: a plain dependency costs a thread hand-off
    per request."""
    return {"user_agent": request.headers.get("user-agent"), "accept_language": request.headers.get("accept-language")}
