"""Rate-limit tests against a real redis-server."""
