"""llamagrid router: the public gRPC entry (see issue 3)."""
