"""Token-bucket rate limiting in Redis: one Lua script, so it is exact across any number of
replicas (no read-modify-write race), and it uses Redis's clock, so replicas whose clocks
disagree still share one notion of elapsed time.

    limiter = TokenBucketLimiter(client)
    decision = limiter.acquire("bucket-key", rate_per_s=200, burst=400)
    if not decision.allowed: answer 429 with Retry-After: decision.retry_after_s
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

# KEYS[1] = bucket hash {tokens, ts_us}; ARGV = rate per second, burst, cost.
# Returns {allowed (0/1), milliseconds until `cost` tokens are available}.
_ACQUIRE = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000000) end
local allowed, wait_ms = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait_ms}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_ms: int

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for the `Retry-After` header, never 0 for a refusal."""
        return max(1, math.ceil(self.retry_after_ms / 1000)) if not self.allowed else 0


class TokenBucketLimiter:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, bucket: str, rate_per_s: float, burst: int, cost: int = 1) -> RateDecision:
        if rate_per_s <= 0 or burst < 1 or cost < 1:
            raise ValueError("rate_per_s must be > 0, burst and cost >= 1")
        allowed, wait_ms = self._acquire(keys=[bucket], args=[rate_per_s, burst, cost])
        return RateDecision(allowed=bool(allowed), retry_after_ms=int(wait_ms))
