"""llamagrid router: the public gRPC entry (API keys, rate limits, balancing, relay and failover)."""
