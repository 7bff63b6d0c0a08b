"""Builds a worker from its config (model, KV pool, engine, gRPC server) and runs it until stopped: wiring only."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common.connections import server_options
from common.internal_auth import InternalTokenInterceptor
from common.logs import adopt_library_loggers
from common.ports import write_port_file
from common.rpc_guard import RequestGuard
from common.signals import until_terminated
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from worker.config import WorkerConfig
from worker.devices import resolve_device, resolve_dtype
from worker.engine import Engine, EngineRequest, ErrorEvent, FinishEvent
from worker.faults import FaultPlan
from worker.grammar import Grammars
from worker.heartbeat import Heartbeat
from worker.kv_cache import BlockManager
from worker.kv_sizing import CacheLayout, plan_kv_cache
from worker.metrics import WorkerMetrics, serve_metrics, stop_metrics
from worker.model.llama import LlamaForCausalLM
from worker.model.loader import load_hf_config, load_model
from worker.model_runner import ModelRunner
from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import SamplingParams
from worker.server import WorkerServicer
from worker.service import WorkerInfo, WorkerService
from worker.tokenizer import Tokenizer
from worker.tp.group import RankGroup, check_tp_config
from worker.validation import Limits

log = structlog.get_logger("worker.app")

WORKER_SERVICE = "llamagrid.worker.v1.Worker"
HEALTH_NAMES = ("", WORKER_SERVICE)  # "" is the whole server's health
# Routers hold one long-lived connection per worker and multiplex every call on it: no idle or age limit, no cap on
# streams. Keepalive ends the calls of a router that died without closing its connection.
WORKER_CONNECTIONS = server_options(keepalive_time_s=60.0, keepalive_timeout_s=20.0, min_client_ping_interval_s=10.0)


class Worker:
    """One replica: the model runner (with its tensor-parallel ranks), the engine thread and the WorkerService."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.heartbeat = Heartbeat(config.run_dir, 0) if config.run_dir else None
        started = time.monotonic()
        hf_config = load_hf_config(config.model_dir)
        check_tp_config(hf_config, config.tp_size, self.device)
        self.group = RankGroup(config, self.device) if config.tp_size > 1 else None  # spawns ranks 1..N-1
        model, self.layout = self._load_model(hf_config)
        self.runner = self._build_runner(model)
        self.tokenizer = Tokenizer(config.model_dir, hf_config.vocab_size)
        self.engine = self._build_engine()
        self.engine.grammars = Grammars(self.tokenizer.hf, hf_config.vocab_size)
        self.runner.start_ticker(lambda: self.engine.load)  # no thread unless tensor parallel or heartbeating
        self.service = WorkerService(self.engine, self.tokenizer, self._limits(), self._info(hf_config.vocab_size))
        self.metrics: WorkerMetrics | None = None
        log.info("worker_loaded", load_s=round(time.monotonic() - started, 2), kv_blocks=self.layout.num_blocks,
                 kv_pool_bytes=self.runner.kv_cache_bytes, max_context=self.layout.max_context,
                 device=str(self.device), dtype=str(self.dtype), decode_attention=config.decode_attention)

    @property
    def info(self) -> WorkerInfo:
        return self.service.info

    def _load_model(self, hf_config) -> tuple[LlamaForCausalLM, CacheLayout]:
        """This rank's model shard, and the KV pool it can hold (the one every rank can, when tensor parallel)."""
        config, group = self.config, self.group
        model = load_model(config.model_dir, dtype=self.dtype, device=self.device, tp=group.tp if group else None)
        layout = plan_kv_cache(config, hf_config, self.dtype, self.device)
        if group:
            layout = layout.with_num_blocks(group.agree_num_blocks(layout.num_blocks))
        return model, layout

    def _build_runner(self, model: LlamaForCausalLM) -> ModelRunner:
        config, group, layout = self.config, self.group, self.layout
        return ModelRunner(
            model, num_blocks=layout.num_blocks, block_size=layout.block_size, dtype=self.dtype, device=self.device,
            tp=group.tp if group else None, plans=group.plans if group else None,
            on_group_failure=group.abort if group else None, heartbeat=self.heartbeat,
            cuda_graphs=config.cuda_graphs, max_num_seqs=config.max_num_seqs, max_context=layout.max_context,
            decode_attention=config.decode_attention,
        )

    def _build_engine(self) -> Engine:
        config, layout = self.config, self.layout
        scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=layout.max_context),
            BlockManager(layout.num_blocks, layout.block_size, config.enable_prefix_caching),
        )
        fault_plan = FaultPlan.parse(config.inject_fault)
        if fault_plan:
            log.warning("fault_injection_active", spec=config.inject_fault)
        return Engine(scheduler, self.runner, self.tokenizer.decoder, self.tokenizer.eos_token_ids,
                      faults=fault_plan)

    def _limits(self) -> Limits:
        config = self.config
        return Limits(max_context=self.layout.max_context, default_max_new_tokens=config.default_max_new_tokens,
                      max_stop_strings=config.max_stop_strings, max_stop_chars=config.max_stop_chars,
                      max_message_chars=config.max_message_chars)

    def _info(self, vocab_size: int) -> WorkerInfo:
        config, layout = self.config, self.layout
        return WorkerInfo(
            model=config.served_model_name, max_context=layout.max_context, tp_size=config.tp_size,
            kv_capacity_tokens=layout.num_blocks * layout.block_size, block_size=layout.block_size,
            max_num_seqs=config.max_num_seqs, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device), vocab_size=vocab_size, default_max_new_tokens=config.default_max_new_tokens,
        )

    def warm_up(self) -> None:
        """Run one short request through the engine thread so the first real one is not slow."""
        finished: list[FinishEvent] = []
        ready = threading.Event()

        def sink(events) -> None:
            for e in events:
                if isinstance(e, FinishEvent):
                    finished.append(e)
                    ready.set()
                elif isinstance(e, ErrorEvent):
                    ready.set()

        prompt = [self.tokenizer.bos_token_id or 1] * min(self.config.block_size * 2, self.layout.max_context - 4)
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        self.engine.submit(EngineRequest("warmup", prompt, params, sink))
        if not ready.wait(300):
            raise RuntimeError("warm-up did not finish in 300 s")
        if not finished:
            raise RuntimeError("warm-up request failed")
        self.engine.reset_prefix_cache()

    def close(self) -> None:
        """After engine.stop(): stop the other tensor-parallel ranks (STOP plan) and wait for them."""
        self.runner.shutdown()
        if self.group:
            self.group.close()


def build_server(worker: Worker, host: str, port: int) -> tuple[grpc.aio.Server, int, HealthServicer]:
    token = worker.config.internal_token
    # the token check comes first: a call without the token is refused before its request is parsed
    interceptors = [InternalTokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *WORKER_CONNECTIONS],
                             interceptors=[*interceptors, RequestGuard()])
    servicer = WorkerServicer(worker.service)
    if worker.metrics is not None:  # requests_total / request_duration_seconds via common.errors' decorators
        servicer.rpc_observer = worker.metrics.rpc.observer(WORKER_SERVICE)
    wpb_grpc.add_WorkerServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (WORKER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    return server, bound, health


async def _set_health(health: HealthServicer, status) -> None:
    for name in HEALTH_NAMES:
        await health.set(name, status)


def _serve_metrics(worker: Worker, port_file: Path | None):
    """Prometheus /metrics on --metrics-port; its port goes to <port_file>.metrics before the port file itself,
    so a launcher that sees that one finds this one too."""
    config = worker.config
    worker.metrics = worker.service.metrics = WorkerMetrics(config.served_model_name, worker.service)
    metrics_http = serve_metrics(worker.metrics.registry, config.host, config.metrics_port)
    log.info("metrics_serving", port=metrics_http.server_port)
    if port_file is not None:
        tmp = Path(f"{port_file}.metrics.tmp")
        tmp.write_text(str(metrics_http.server_port))
        tmp.replace(Path(f"{port_file}.metrics"))
    return metrics_http


async def serve(config: WorkerConfig, port_file: Path | None = None) -> None:
    """Load, warm up, serve until SIGTERM/SIGINT, then drain in-flight requests and stop."""
    adopt_library_loggers()  # transformers, imported with this module after logging was configured
    worker = Worker(config)
    metrics_http = _serve_metrics(worker, port_file) if config.metrics_port is not None else None
    server, port, health = build_server(worker, config.host, config.port)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    worker.engine.start()
    await asyncio.get_running_loop().run_in_executor(None, worker.warm_up)
    worker.service.is_accepting = True
    await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
    if port_file is not None:
        write_port_file(port_file, port)
    log.info("worker_serving", port=port, model=config.served_model_name, internal_token=bool(config.internal_token))

    await until_terminated()

    await _drain(worker, health)
    await server.stop(grace=1.0)
    worker.engine.stop()
    worker.close()
    if metrics_http is not None:
        stop_metrics(metrics_http)
    log.info("worker_stopped")


async def _drain(worker: Worker, health: HealthServicer) -> None:
    """Refuse new jobs (NOT_SERVING), end the CacheEvents streams (no router routes here any more, and open streams
    would hold up the server's stop) and wait up to drain_timeout_s for the jobs in flight."""
    log.info("worker_draining", num_in_flight=worker.service.num_in_flight)
    worker.service.is_accepting = False
    worker.engine.cache_events.close()
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + worker.config.drain_timeout_s
    while worker.service.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
