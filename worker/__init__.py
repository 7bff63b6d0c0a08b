"""llamagrid worker: one replica serving a Llama-2 model over gRPC."""
