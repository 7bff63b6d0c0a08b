"""llamagrid token-bucket rate limits on Redis (see issue 3)."""
