"""ASGI middleware refusing request bodies above a size limit with 413, before they are parsed.

A declared Content-Length over the limit is refused without reading the body; a chunked body
is counted as it streams and refused as soon as it passes the limit.

    api.add_middleware(BodySizeLimit, max_bytes_of=lambda: 2_000_000)
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from fastapi import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def too_large_detail(max_bytes: int) -> list[dict[str, Any]]:
    return [{"loc": ["body"], "msg": f"request body larger than {max_bytes} bytes", "type": "too_large"}]


class BodySizeLimit:
    def __init__(self, app: Callable, max_bytes_of: Callable[[], int]):
        self.app = app
        # A callable: in a Serve replica the limit comes from settings known only after the
        # app object is frozen.
        self.max_bytes_of = max_bytes_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes_of()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply_413(send, limit)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI passes HTTPExceptions raised while reading the body through as is.
                    raise HTTPException(413, too_large_detail(limit))
            return message

        await self.app(scope, counted, send)


async def _reply_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": too_large_detail(limit)}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
