"""More calls accepted per event-loop pass: extra outstanding "request call"s for the public methods.

grpc.aio's server keeps one outstanding request for new calls per method. Each accepted call takes several passes
of the event loop (the request's completion, its task, the serving loop's wait, a new request task) before the next
call of that method can be matched, so under a burst new calls queue inside gRPC core at a rate set by how long
the loop's passes are, which on a busy router is most of a stream's time to first token (bench/router_overhead.py,
--keep-logs: the router's own ttft_ms is a fraction of what the client sees). Here `count` more requests per method
stay outstanding, each re-armed by a small task of its own, so a burst is matched `count` calls per pass. (The worker's
server gains nothing from it in the same benchmark: its calls come from a few routers and its loop is not the
bottleneck.)

This drives grpc.aio's server through its Cython internals (the same calls its serving loop makes). Every name it
needs is checked at start; when one is missing (another grpc version), it logs `extra_acceptors_unavailable` and
the server accepts calls as grpc.aio does by itself.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

log = structlog.get_logger("router.accept")

try:
    from grpc._cython import cygrpc
except ImportError:  # pragma: no cover
    cygrpc = None

# the module-level names used, with the arguments each must take in this order (checked at start)
_SIGNATURES = {
    "_handle_rpc": ("method_name", "method_resolver", "interceptors", "rpc_state", "loop", "concurrency_exceeded"),
    "_schedule_rpc_coro": ("rpc_coro", "rpc_state", "loop", "method_name"),
}


def _missing(server: grpc.aio.Server) -> list[str]:
    """What this grpc lacks of the internals used, by name; empty when all are there with the expected arguments."""
    if cygrpc is None:
        return ["grpc._cython.cygrpc"]
    out = [] if hasattr(cygrpc, "_MethodResolver") else ["_MethodResolver"]
    for name, args in _SIGNATURES.items():
        code = getattr(getattr(cygrpc, name, None), "__code__", None)
        if code is None or code.co_varnames[: code.co_argcount] != args:
            out.append(f"{name}{args}")
    if not hasattr(getattr(server, "_server", None), "_request_registered_call"):
        out.append("AioServer._request_registered_call")
    return out


class _Collector:
    """Stands in for a server when a generated add_*Servicer_to_server is called: keeps the method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass


def method_handlers(add_to_server, servicer) -> dict[str, grpc.RpcMethodHandler]:
    """The fully qualified method -> handler map a generated add_*Servicer_to_server registers."""
    collector = _Collector()
    add_to_server(servicer, collector)
    return collector.handlers


class ExtraAcceptors:
    def __init__(self, server: grpc.aio.Server, handlers: dict[str, grpc.RpcMethodHandler],
                 interceptors: tuple, count: int) -> None:
        self._server = server
        self._handlers = handlers
        self._interceptors = tuple(interceptors)
        self._count = count
        self._loops: list[asyncio.Task] = []
        self._calls: set[asyncio.Task] = set()
        self.accepted = 0  # calls these loops were handed (the rest went to grpc.aio's own request)

    def start(self) -> bool:
        """Start the accept loops (after the server started); False, and nothing started, where grpc lacks a name."""
        if self._count <= 0 or not self._handlers:
            return False
        missing = _missing(self._server)
        if missing:
            log.warning("extra_acceptors_unavailable", missing=missing, grpc_version=grpc.__version__)
            return False
        core = self._server._server
        loop = asyncio.get_running_loop()
        resolver = cygrpc._MethodResolver([], self._handlers)
        for method in self._handlers:
            for _ in range(self._count):
                self._loops.append(loop.create_task(self._accept(core, resolver, method, loop)))
        return True

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self._loops)

    async def ended(self) -> None:
        """Returns once every accept loop has ended (after the server stopped)."""
        await asyncio.gather(*self._loops)

    async def _accept(self, core, resolver, method: str, loop: asyncio.AbstractEventLoop) -> None:
        # Never cancelled from outside: a request call cancelled while outstanding would leave gRPC core a request
        # whose call nobody handles. The server's shutdown fails the outstanding one, which ends this loop.
        name = method.encode()
        while True:
            try:
                rpc_state = await core._request_registered_call(name)
            except Exception:  # (grpc's _RequestCallError: the server is shutting down)
                return
            self.accepted += 1
            coro = cygrpc._handle_rpc(method, resolver, self._interceptors, rpc_state, loop, False)
            task = loop.create_task(cygrpc._schedule_rpc_coro(coro, rpc_state, loop, method))
            self._calls.add(task)  # (the loop keeps only a weak reference to a task)
            task.add_done_callback(self._calls.discard)
