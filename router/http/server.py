"""uvicorn serving the HTTP edge on the router's own event loop: started next to the gRPC server, stopped (drained)
with it. No signal handlers of its own (the router's decide when to stop), no access log (the router logs each
call's request_finished, ids and numbers only)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import uvicorn

from router.http.app import Edge, build_app


class HttpServer:
    def __init__(self, edge: Edge, host: str, port: int, reuse_port: bool = False, grace_s: float = 30.0,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        """With `tls_cert` and `tls_key` (the router's own, as its gRPC port uses), HTTPS."""
        self.sock = _listen(host, port, reuse_port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(build_app(edge), loop="none", http="httptools", lifespan="off", access_log=False,
                                log_config=None, server_header=False, timeout_graceful_shutdown=grace_s,
                                timeout_keep_alive=75, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        self.server = uvicorn.Server(config)
        self._ticks: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.server.config
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[self.sock])
        # (uvicorn's once-a-second housekeeping: the Date header; its signal handling is not used)
        self._ticks = asyncio.create_task(self.server.main_loop(), name="http-server-ticks")

    async def stop(self) -> None:
        """No new connections; requests in flight get the grace period, then are cancelled."""
        self.server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        await self.server.shutdown(sockets=[self.sock])


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # the processes of `--processes N` share the port, as they share the gRPC one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
