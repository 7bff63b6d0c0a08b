"""router.accept: extra outstanding request calls on a real grpc.aio server hand calls to the method's handler
through the server's interceptors, end when the server stops, and stand aside when grpc lacks what they use."""

from __future__ import annotations

import asyncio
import types

import grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router import accept
from router.accept import ExtraAcceptors, method_handlers


class Streamer(pb_grpc.InferenceServicer):
    async def GenerateStream(self, request, context):
        for i in range(request.parameters.max_new_tokens):
            yield pb.GenerateChunk(text=str(i))

    async def ListModels(self, request, context):
        return pb.ListModelsResponse()


class Seen(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, details):
        self.methods.append(details.method)
        return await continuation(details)


async def _serve(count: int, seen: Seen):
    server = grpc.aio.server(interceptors=[seen])
    servicer = Streamer()
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    acceptors = ExtraAcceptors(server, method_handlers(pb_grpc.add_InferenceServicer_to_server, servicer), (seen,),
                               count)
    return server, acceptors, f"127.0.0.1:{port}"


async def _burst(address: str, calls: int) -> list[list[str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(inputs=["x"], parameters=pb.SamplingParameters(max_new_tokens=5))

        async def one() -> list[str]:
            return [c.text async for c in stub.GenerateStream(request, timeout=30)]

        return await asyncio.gather(*(one() for _ in range(calls)))


def test_a_burst_is_served_by_the_extra_requests_through_the_interceptors():
    async def main():
        seen = Seen()
        server, acceptors, address = await _serve(8, seen)
        assert acceptors.start()
        assert acceptors.running == 8 * len(method_handlers(pb_grpc.add_InferenceServicer_to_server, Streamer()))
        results = await _burst(address, 64)
        assert results == [["0", "1", "2", "3", "4"]] * 64
        assert acceptors.accepted > 0  # (most of the burst: 8 requests outstanding against grpc.aio's 1)
        assert seen.methods.count("/llamagrid.v1.Inference/GenerateStream") == 64
        async with grpc.aio.insecure_channel(address) as channel:  # a unary method too
            await pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        await asyncio.wait_for(server.stop(1), 10)
        await asyncio.wait_for(acceptors.ended(), 10)  # the shutdown fails each outstanding request: every loop ends
        assert acceptors.running == 0

    asyncio.run(main())


def test_grpc_without_the_internals_keeps_its_own_accepting(monkeypatch):
    monkeypatch.setattr(accept, "cygrpc", types.SimpleNamespace(_MethodResolver=object))

    async def main():
        server, acceptors, address = await _serve(8, Seen())
        assert not acceptors.start()
        assert acceptors.running == 0
        assert await _burst(address, 8) == [["0", "1", "2", "3", "4"]] * 8
        await server.stop(1)

    asyncio.run(main())


def test_zero_starts_nothing():
    async def main():
        server, acceptors, _ = await _serve(0, Seen())
        assert not acceptors.start() and acceptors.running == 0
        await server.stop(None)

    asyncio.run(main())
