#!/usr/bin/env python3
"""A grpc.health.v1 probe for container health checks: `llamagrid-healthcheck [--service NAME] HOST:PORT`.

Exit status 0 when the server answers SERVING for the service ("" = the whole server), 1 otherwise (NOT_SERVING,
UNKNOWN, unreachable, or no answer within --timeout). Both images install this file as /usr/local/bin/
llamagrid-healthcheck: it uses only grpcio and grpcio-health-checking, which both install (the `router` extra), so
no probe binary is downloaded at build time. Workers answer NOT_SERVING while loading, warming up or draining and
nothing at all while their supervisor restarts them; the router answers SERVING for "" while it runs.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamagrid-healthcheck", description="grpc.health.v1 Check as an exit status.")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help='health service name (default "": the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for connecting and the call together")
    return p


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, a one-line reason) for one Health.Check call."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ok, reason = check(args.address, args.service, args.timeout)
    print(f"{args.address} service={args.service!r}: {reason}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
