"""The router's HTTP edge: OpenAI- and MosaicML-compatible APIs on the router's own event loop (router.http.app),
sharing admission, relay, failover, metrics and the request log with the gRPC API through RouterServicer's call
bodies."""
