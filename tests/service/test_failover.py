"""Failover that loses nothing, on real replicas: two supervised workers (one TP=2) behind a router process under
200 concurrent streams (greedy and seeded sampling).

Run 1 is fault-free and gives the reference outputs. Run 2 kill -9s a rank of the TP=2 replica mid-load, once some
of its requests have streamed tokens and still run: every request completes, every output equals the reference
(the ones resumed mid-stream on the other replica included), and the supervisor restarts the replica's whole rank
group. The
router's failover logic in other faults (a replica dying again and again, a Chat session moving mid-reply, a replica
that never serves): test_router_failover.py, on fake workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from ratelimit.redis_server import free_port
from tests.support.router import RouterProcess, auth, create_keys, wait_routable
from tests.support.supervised import group_processes
from tests.support.waits import wait_until

NUM_REQUESTS = 200
WORKER_ARGS = ("--model", "{model}", "--kv-cache-tokens", "6144", "--max-num-seqs", "64", "--num-threads", "1")
SUPERVISOR_ARGS = ("--backoff-initial", "0.2", "--heartbeat-timeout", "15", "--stable-after", "5")
TIERS = ("[tiers.load]\nrequests_per_minute = 1000000\ntokens_per_minute = 100000000\n"
         "max_concurrent_requests = 1000\n")  # the load's streams run all at once


def _requests() -> list[pb.GenerateRequest]:
    rng = random.Random(4)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "quickly"]
    out = []
    for i in range(NUM_REQUESTS):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
        params = pb.SamplingParameters(max_new_tokens=rng.randint(16, 48), ignore_eos=True)
        if i % 2:
            params.temperature, params.top_p, params.seed = 0.8, 0.9, 1000 + i
        else:
            params.temperature = 0.0
        out.append(pb.GenerateRequest(inputs=[prompt], parameters=params))
    return out


class Replica:
    """`python -m worker.supervisor` around one worker group on a fixed port; its log is JSON lines in a file."""

    def __init__(self, tmp: Path, name: str, model: Path, *extra: str, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        args = [a.format(model=model) for a in WORKER_ARGS]
        cmd = [sys.executable, "-m", "worker.supervisor", *SUPERVISOR_ARGS, "--", *args, "--port", str(self.port),
               *extra]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stderr=self._log, env={**os.environ, **(env or {})})

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):  # a line cut short by a crash
                    out.append(json.loads(line))
        return out

    def serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                return status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def wait_serving(self, timeout_s: float = 120.0, starts: int = 1) -> None:
        def serving() -> bool:
            assert self.proc.poll() is None, f"supervisor exited:\n{self.log_path.read_text()[-3000:]}"
            return len(self.events("group_serving")) >= starts and self.serving()

        wait_until(serving, f"{self.log_path.stem} to serve (start {starts})", timeout_s)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def cluster(tiny_gqa_model_dir, redis_server, tmp_path_factory):
    """Replicas A (TP=2) and B, a key, and a router process that lists both."""
    tmp = tmp_path_factory.mktemp("failover")
    replicas = {}
    router = None
    try:
        replicas["a"] = Replica(tmp, "a", tiny_gqa_model_dir, "--tp", "2")
        replicas["b"] = Replica(tmp, "b", tiny_gqa_model_dir)
        tiers = tmp / "tiers.toml"
        tiers.write_text(TIERS)
        key = create_keys(redis_server.url, {"load": ("load", [])})["load"]
        # the router starts while the replicas do; the load waits until it has seen both serve
        router = RouterProcess(tmp / "router.log", "--workers", f"{replicas['a'].address},{replicas['b'].address}",
                               "--redis-url", redis_server.url, "--tiers", str(tiers), "--failover-wait", "60")
        for r in replicas.values():
            r.wait_serving()
            router.wait_event("worker_healthy", where=lambda e, r=r: e["address"] == r.address, timeout_s=60)
        wait_routable(router.address, key, 60)
        yield {"router": router.address, "key": key, "replicas": replicas, "router_log": router.log_path}
    finally:
        if router is not None:
            router.proc.terminate()
        for r in replicas.values():  # all drain at once
            r.terminate()
        if router is not None:
            router.stop()
        for r in replicas.values():
            r.stop()


class Load:
    """The outputs of one run, comparable across runs, and per-request timings (not compared)."""

    def __init__(self, outputs: list[tuple], latencies: list[float], max_gaps: list[float]):
        self.outputs, self.latencies, self.max_gaps = outputs, latencies, max_gaps


async def _run_load(address: str, key: str, requests: list[pb.GenerateRequest], tag: str = "load",
                    on_running=None) -> Load:
    """All requests at once as GenerateStream calls (x-request-id `{tag}-{i}`). Outputs are (token_ids, text,
    finish_reason, completion_tokens) per request. `on_running(num_streaming)`, if given, is called (in a thread)
    every 20 ms while the load runs, with the number of requests that have streamed tokens and not ended, until it
    returns True."""
    streaming = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(i: int, req: pb.GenerateRequest) -> tuple:
            nonlocal streaming
            ids, text, fin = [], [], None
            t0 = last = time.monotonic()
            max_gap = 0.0
            metadata = (*auth(key), ("x-request-id", f"{tag}-{i}"))
            async for chunk in stub.GenerateStream(req, metadata=metadata, timeout=300):
                now = time.monotonic()
                if ids:
                    max_gap = max(max_gap, now - last)
                elif chunk.token_ids:
                    streaming += 1
                last = now
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
                if chunk.finish_reason:
                    fin = chunk
                    streaming -= 1
            output = (tuple(ids), "".join(text), fin.finish_reason, fin.usage.completion_tokens)
            return output, time.monotonic() - t0, max_gap

        async def watch() -> None:
            while not await asyncio.to_thread(on_running, streaming):
                await asyncio.sleep(0.02)  # (between two checks of the condition)

        watcher = asyncio.create_task(watch()) if on_running is not None else None
        try:
            results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            if watcher is not None:
                watcher.cancel()
    return Load([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _resumed_figures(cluster, tag: str, load: Load, reference: Load) -> str:
    """Which requests of run `tag` the router resumed mid-stream, and what that cost them."""
    failovers = [e for e in _router_events(cluster, "worker_failover") if e["request_id"].startswith(f"{tag}-")]
    resumed = {int(e["request_id"].split("/")[0].rsplit("-", 1)[1]) for e in failovers if e.get("resumed_tokens")}
    assert resumed, f"no request was resumed mid-stream ({len(failovers)} failed over before their first token)"
    extra = [load.latencies[i] - reference.latencies[i] for i in resumed]
    gaps = [load.max_gaps[i] for i in resumed]
    return (f"{len(resumed)} requests resumed mid-stream; extra end-to-end latency vs the fault-free run p50/p99 "
            f"{_percentile(extra, 0.5) * 1e3:.0f}/{_percentile(extra, 0.99) * 1e3:.0f} ms; longest pause in their "
            f"streams p50/p99 {_percentile(gaps, 0.5) * 1e3:.0f}/{_percentile(gaps, 0.99) * 1e3:.0f} ms "
            f"(fault-free run: p50 {_percentile(reference.max_gaps, 0.5) * 1e3:.0f} ms)")


@pytest.fixture(scope="module")
def reference(cluster) -> Load:
    return asyncio.run(_run_load(cluster["router"], cluster["key"], _requests(), tag="reference"))


def test_reference_run_is_complete(reference):
    assert len(reference.outputs) == NUM_REQUESTS
    assert all(len(ids) == n for ids, _, _, n in reference.outputs)


def test_kill_a_tp_rank_mid_load_loses_nothing(cluster, reference):
    a = cluster["replicas"]["a"]
    serving = a.events("group_serving")[-1]
    pgid = a.events("group_started")[-1]["pids"][0]  # rank 0's PID, its group's id
    rank1 = [pid for pid in serving["pids"] if pid != pgid]
    assert rank1, f"no rank 1 pid in {serving}"
    finished_before = len(a.events("request_finished"))
    killed = {}

    def kill_once_a_is_mid_stream(num_streaming: int) -> bool:
        """Kill rank 1 once A streams: it has finished a request of this run (its first batch is decoding) and still
        runs some, while requests that streamed tokens have not ended."""
        if num_streaming == 0 or len(a.events("request_finished")) == finished_before:
            return False
        with grpc.insecure_channel(a.address) as ch:
            try:
                load = wpb_grpc.WorkerStub(ch).Load(wpb.LoadRequest(), timeout=5)
            except grpc.RpcError:
                return False
        if load.num_running == 0:
            return False
        os.kill(rank1[0], signal.SIGKILL)
        killed["at"] = time.monotonic()
        return True

    load = asyncio.run(_run_load(cluster["router"], cluster["key"], _requests(), tag="kill",
                                 on_running=kill_once_a_is_mid_stream))
    assert killed, "the load ended before the kill"
    mismatches = [i for i, (got, want) in enumerate(zip(load.outputs, reference.outputs, strict=True))
                  if got != want]
    assert not mismatches, f"{len(mismatches)} outputs differ from the fault-free run, e.g. request {mismatches[0]}"
    a.wait_serving(starts=2)
    # the supervisor restarted the whole group: the dead rank seen either directly (rank 1's PID is gone) or
    # through rank 0, which exits as soon as a rank is lost; no rank of the old group lingers
    failed = a.events("group_failed")
    assert failed and failed[-1]["cause"] == "crash", failed
    assert failed[-1]["rank"] == 1 or failed[-1]["exit_code"] is not None, failed
    assert len(a.events("group_started")) == 2
    assert group_processes(pgid) == []
    print(f"\nTP=2 replica back to SERVING {time.monotonic() - killed['at']:.1f} s after kill -9 of rank 1 "
          f"(supervisor: {a.events('group_serving')[-1]['startup_s']} s from restart)")
    print(f"kill -9: 0 of {NUM_REQUESTS} requests lost; {_resumed_figures(cluster, 'kill', load, reference)}")


def _router_events(cluster, name: str) -> list[dict]:
    out = []
    for line in cluster["router_log"].read_text(errors="replace").splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out
