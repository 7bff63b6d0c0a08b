"""The floor of a Python gRPC relay: a bare grpc.aio pass-through from llamagrid.v1 GenerateStream to Worker.Run.

No API keys, no rate limits, no worker pool, no failover, no logging: one hop's worth of gRPC and nothing else.
bench/router_overhead.py runs it beside the router, in front of the same worker, so a reader can tell what the
router's own work costs (router minus relay) from what any Python gRPC hop costs on the machine (relay minus
direct). Serves only what that benchmark sends (one input per request) and ListModels (from the worker's
Worker.Info); not a product component.

    .venv/bin/python bench/bare_relay.py --worker 127.0.0.1:50051 --port-file /tmp/relay.port
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.ports import write_port_file  # noqa: E402
from common.signals import until_terminated  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2 as wpb  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc  # noqa: E402


class BareRelay(pb_grpc.InferenceServicer):
    def __init__(self, worker: str) -> None:
        self.channel = grpc.aio.insecure_channel(worker)
        self.worker = wpb_grpc.WorkerStub(self.channel)
        self.calls = 0

    async def ListModels(self, request, context):
        info = await self.worker.Info(wpb.InfoRequest(), timeout=context.time_remaining())
        return pb.ListModelsResponse(models=[pb.ModelInfo(name=info.model, max_context=info.max_context)])

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        if len(request.inputs) != 1:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bare relay takes exactly one input")
        self.calls += 1
        job = wpb.Job(request_id=f"relay-{self.calls}/0", model=request.model, parameters=request.parameters,
                      text=request.inputs[0])
        async for event in self.worker.Run(job, timeout=context.time_remaining()):
            if event.HasField("delta"):
                yield pb.GenerateChunk(text=event.delta.text, token_ids=event.delta.token_ids)
            else:
                fin = event.finished
                yield pb.GenerateChunk(text=fin.last_delta.text, token_ids=fin.last_delta.token_ids,
                                       finish_reason=fin.finish_reason, usage=fin.usage)
                return


async def serve(worker: str, port: int, port_file: Path | None) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    relay = BareRelay(worker)
    pb_grpc.add_InferenceServicer_to_server(relay, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if port_file is not None:
        write_port_file(port_file, bound)
    await until_terminated()
    await server.stop(1.0)
    await relay.channel.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", required=True, help="host:port of the worker")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop (as the router does when it can)")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.worker, args.port, args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
