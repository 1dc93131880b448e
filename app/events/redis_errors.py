"""Which Redis errors mean "not now" rather than "never".

Redis answers some writes with a refusal that passes by itself or by an operator's hand: OOM
(maxmemory reached: the export trims, or the limit is raised), READONLY (a replica during a
failover, until clients follow the new primary) and BUSY (a long script is running). A job
that took these for bad data would dead-letter good records, and the dead-letter stream would
grow a Redis that is already full; they are retried instead, and the records stay where they
are.

    if is_transient(exc): back off and retry, keep the record; else dead-letter it
"""

from __future__ import annotations

import redis

REFUSALS = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)

_REFUSAL_CODES = ("OOM", "READONLY", "BUSY")


def is_refusal(exc: BaseException) -> bool:
    """Redis refused the command for now: full, read-only, or busy with a script."""
    if isinstance(exc, REFUSALS):
        return True
    if not isinstance(exc, redis.exceptions.ResponseError):
        return False
    message = str(exc)
    # BUSY has no exception class of its own; before Redis 7 a refusal inside a Lua script comes
    # back as a plain ResponseError "Error running script ...: -OOM command not allowed ...".
    return message.startswith("BUSY ") or any(f"-{code} " in message for code in _REFUSAL_CODES)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection failed or timed out (a restart, a stall), or a refusal."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) or is_refusal(exc)
