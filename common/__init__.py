"""What every llamagrid process uses: JSON logging, ports, signals, the mapping of errors to gRPC statuses, RPC
metrics, internal auth and connection settings. It imports none of worker/, router/ or ratelimit/."""
