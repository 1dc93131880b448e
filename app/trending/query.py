"""Validation of GET /v1/trending's query, as FastAPI-shaped 422 errors naming the parameter."""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def trending_query_errors(genre: str | None, locale: str | None, k: int, max_k: int) -> list[dict]:
    errors = []
    for field, value in (("genre", genre), ("locale", locale)):
        if value is not None and not NAME.match(value):
            errors.append({"loc": ["query", field], "msg": f"{field} must be 1-64 letters, digits, '.', '_' or '-'", "type": "value_error"})
    if not 1 <= k <= max_k:
        errors.append({"loc": ["query", "k"], "msg": f"k must be between 1 and {max_k}", "type": "value_error"})
    return errors
