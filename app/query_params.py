"""Query parameters a route does not take are an error, not noise."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import Request


async def query_names(request: Request) -> list[str]:
    """The query parameters' names, as a dependency: a method of the Serve ingress class that
    names `request: Request` itself gets it taken for a required query parameter. `async` so
    FastAPI runs it inline rather than in a worker thread."""
    return list(request.query_params.keys())


def unknown_parameter_errors(given: Iterable[str], taken: Iterable[str]) -> list[dict]:
    """One 422 entry per query parameter the route does not take, in the client's order. A
    misspelt or unsupported filter (`?explict=false`, `?exclude=heard`) that was ignored would
    answer as if the client had not asked: they would never learn the list is not filtered."""
    taken = set(taken)
    names = ", ".join(sorted(taken))
    return [
        {"loc": ["query", name], "msg": f"unknown query parameter; this route takes {names}", "type": "extra_forbidden"}
        for name in dict.fromkeys(given) if name not in taken
    ]
