"""llamagrid token-bucket rate limits on Redis."""

from ratelimit.limiter import (
    REQUESTS,
    TOKENS,
    Decision,
    Limit,
    QuotaDecision,
    RateLimitBackendError,
    RateLimiter,
    connect,
)

__all__ = [
    "REQUESTS", "TOKENS", "Decision", "Limit", "QuotaDecision", "RateLimitBackendError", "RateLimiter", "connect",
]
