"""Failover that loses nothing: supervised replicas (one TP=2) behind a router under 200 concurrent streams.

Run 1 is fault-free and gives the reference outputs. Run 2 kill -9s a rank of the TP=2 replica mid-load; run 3
injects repeated OOM into another replica mid-load (it exits with the OOM code). In both, every request completes
and every output equals the reference; the supervisors bring the replicas back and the router uses them again.
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
from ratelimit.redis_server import RedisServer, free_port
from tests.service.router_harness import auth, create_keys

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
        deadline = time.monotonic() + timeout_s
        while not (len(self.events("group_serving")) >= starts and self.serving()):
            assert self.proc.poll() is None, f"supervisor exited:\n{self.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving:\n{self.log_path.read_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def cluster(tiny_gqa_model_dir, tmp_path_factory):
    """Replicas A (TP=2), B, and C (armed with an OOM for its first start; started by the OOM test), a Redis, a key,
    and a router process that lists all three."""
    tmp = tmp_path_factory.mktemp("failover")
    replicas = {}
    router = None
    with RedisServer() as redis_server:
        try:
            replicas["a"] = Replica(tmp, "a", tiny_gqa_model_dir, "--tp", "2")
            replicas["b"] = Replica(tmp, "b", tiny_gqa_model_dir)
            c_port = free_port()
            for r in replicas.values():
                r.wait_serving()
            tiers = tmp / "tiers.toml"
            tiers.write_text(TIERS)
            key = create_keys(redis_server.url, {"load": ("load", [])})["load"]
            port_file = tmp / "router.port"
            workers = f"{replicas['a'].address},{replicas['b'].address},127.0.0.1:{c_port}"
            router_log = open(tmp / "router.log", "wb")  # noqa: SIM115 - closed below
            router = subprocess.Popen(
                [sys.executable, "-m", "router", "--workers", workers, "--port", "0", "--port-file", str(port_file),
                 "--redis-url", redis_server.url, "--tiers", str(tiers), "--failover-wait", "60"],
                stderr=router_log)
            deadline = time.monotonic() + 30
            while not port_file.exists():
                assert router.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            yield {"router": f"127.0.0.1:{port_file.read_text()}", "key": key, "replicas": replicas, "tmp": tmp,
                   "model": tiny_gqa_model_dir, "c_port": c_port, "router_log": tmp / "router.log"}
        finally:
            if router is not None and router.poll() is None:
                router.send_signal(signal.SIGTERM)
                try:
                    router.wait(30)
                except subprocess.TimeoutExpired:
                    router.kill()
            for r in replicas.values():
                r.stop()


class Load:
    """The outputs of one run, comparable across runs, and per-request timings (not compared)."""

    def __init__(self, outputs: list[tuple], latencies: list[float], max_gaps: list[float]):
        self.outputs, self.latencies, self.max_gaps = outputs, latencies, max_gaps


async def _run_load(address: str, key: str, requests: list[pb.GenerateRequest], on_progress=None,
                    tag: str = "load") -> Load:
    """All requests at once as GenerateStream calls (x-request-id `{tag}-{i}`). Outputs are (token_ids, text,
    finish_reason, completion_tokens) per request. `on_progress(num_with_tokens)` is awaited whenever another
    request receives its first chunk."""
    started = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(i: int, req: pb.GenerateRequest) -> tuple:
            nonlocal started
            ids, text, fin = [], [], None
            t0 = last = time.monotonic()
            max_gap = 0.0
            metadata = (*auth(key), ("x-request-id", f"{tag}-{i}"))
            async for chunk in stub.GenerateStream(req, metadata=metadata, timeout=300):
                now = time.monotonic()
                if ids:
                    max_gap = max(max_gap, now - last)
                last = now
                if not ids and chunk.token_ids:
                    started += 1
                    if on_progress is not None:
                        await on_progress(started)
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
                if chunk.finish_reason:
                    fin = chunk
            output = (tuple(ids), "".join(text), fin.finish_reason, fin.usage.completion_tokens)
            return output, time.monotonic() - t0, max_gap

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return Load([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _resumed_figures(cluster, tag: str, load: Load, reference: Load, require_resumed: bool = True) -> str:
    """Which requests of run `tag` the router resumed mid-stream, and what that cost them."""
    failovers = [e for e in _router_events(cluster, "worker_failover") if e["request_id"].startswith(f"{tag}-")]
    resumed = {int(e["request_id"].split("/")[0].rsplit("-", 1)[1]) for e in failovers if e.get("resumed_tokens")}
    if not resumed:
        assert not require_resumed, "no request was resumed mid-stream"
        assert failovers, "no request failed over"
        return f"{len(failovers)} requests failed over before their first token, none mid-stream"
    extra = [load.latencies[i] - reference.latencies[i] for i in resumed]
    gaps = [load.max_gaps[i] for i in resumed]
    return (f"{len(resumed)} requests resumed mid-stream; extra end-to-end latency vs the fault-free run p50/p99 "
            f"{_percentile(extra, 0.5) * 1e3:.0f}/{_percentile(extra, 0.99) * 1e3:.0f} ms; longest pause in their "
            f"streams p50/p99 {_percentile(gaps, 0.5) * 1e3:.0f}/{_percentile(gaps, 0.99) * 1e3:.0f} ms "
            f"(fault-free run: p50 {_percentile(reference.max_gaps, 0.5) * 1e3:.0f} ms)")


def _wait_routable(cluster, num_models_workers: int = 2, timeout_s: float = 60) -> None:
    with grpc.insecure_channel(cluster["router"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                stub.CountTokens(pb.CountTokensRequest(text="x"), metadata=auth(cluster["key"]), timeout=5)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def _served_by(replica: Replica) -> int:
    return sum(1 for e in replica.events("request_finished"))


@pytest.fixture(scope="module")
def reference(cluster) -> Load:
    _wait_routable(cluster)
    return asyncio.run(_run_load(cluster["router"], cluster["key"], _requests(), tag="reference"))


def test_reference_run_is_complete(reference):
    assert len(reference.outputs) == NUM_REQUESTS
    assert all(len(ids) == n for ids, _, _, n in reference.outputs)


def test_kill_a_tp_rank_mid_load_loses_nothing(cluster, reference):
    a = cluster["replicas"]["a"]
    serving = a.events("group_serving")[-1]
    rank1 = [pid for pid in serving["pids"] if pid != a.events("group_started")[-1]["pids"][0]]
    assert rank1, f"no rank 1 pid in {serving}"
    killed = {}

    async def on_progress(num_started: int) -> None:
        if num_started >= NUM_REQUESTS // 4 and not killed:
            os.kill(rank1[0], signal.SIGKILL)
            killed["at"] = time.monotonic()

    load = asyncio.run(_run_load(cluster["router"], cluster["key"], _requests(), on_progress, tag="kill"))
    assert killed, "the load ended before the kill"
    mismatches = [i for i, (got, want) in enumerate(zip(load.outputs, reference.outputs, strict=True))
                  if got != want]
    assert not mismatches, f"{len(mismatches)} outputs differ from the fault-free run, e.g. request {mismatches[0]}"
    a.wait_serving(starts=2)
    failed = a.events("group_failed")
    assert failed and failed[-1]["cause"] in ("crash", "killed")
    print(f"\nTP=2 replica back to SERVING {time.monotonic() - killed['at']:.1f} s after kill -9 of rank 1 "
          f"(supervisor: {a.events('group_serving')[-1]['startup_s']} s from restart)")
    print(f"kill -9: 0 of {NUM_REQUESTS} requests lost; {_resumed_figures(cluster, 'kill', load, reference)}")


def _router_events(cluster, name: str) -> list[dict]:
    out = []
    for line in cluster["router_log"].read_text(errors="replace").splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def test_repeated_oom_mid_load_loses_nothing(cluster, reference):
    # armed for its first start only: 30 steps after warm-up (mid-load) every step OOMs, so the engine exits 86
    c = Replica(cluster["tmp"], "c", cluster["model"], "--inject-fault", "oom@step=30,times=100,start=1",
                env={"LLAMAGRID_ALLOW_FAULT_INJECTION": "1"}, port=cluster["c_port"])
    cluster["replicas"]["c"] = c
    c.wait_serving()
    deadline = time.monotonic() + 30
    while not [e for e in _router_events(cluster, "worker_healthy") if e["address"] == c.address]:
        assert time.monotonic() < deadline, "the router's pool did not see the replica"
        time.sleep(0.1)
    load = asyncio.run(_run_load(cluster["router"], cluster["key"], _requests(), tag="oom"))
    mismatches = [i for i, (got, want) in enumerate(zip(load.outputs, reference.outputs, strict=True))
                  if got != want]
    assert not mismatches, f"{len(mismatches)} outputs differ from the fault-free run, e.g. request {mismatches[0]}"
    # the OOM may strike while the replica's sequences are still in prefill: then they fail over before any token
    figures = _resumed_figures(cluster, "oom", load, reference, require_resumed=False)
    print(f"\nOOM: 0 of {NUM_REQUESTS} requests lost; {figures}")
    failed = c.events("group_failed")
    assert failed and failed[0]["cause"] == "oom" and failed[0]["exit_code"] == 86
    c.wait_serving(starts=2)
    deadline = time.monotonic() + 30
    while len([e for e in _router_events(cluster, "worker_healthy") if e["address"] == c.address]) < 2:
        assert time.monotonic() < deadline, "the router's pool did not see the restarted replica"
        time.sleep(0.1)
    before = _served_by(c)
    asyncio.run(_run_load(cluster["router"], cluster["key"], _requests()[:40], tag="after-oom"))
    assert _served_by(c) > before, "the router did not use the restarted replica again"



def _chat_turns(address: str, key: str, on_delta=None) -> list[tuple]:
    """Two turns of one Chat session; returns (token_ids, text, finish_reason) per turn."""
    params = pb.SamplingParameters(max_new_tokens=120, temperature=0.7, seed=77, ignore_eos=True)
    turn_done = __import__("threading").Event()

    def requests():
        for content in ("tell me a long story", "and then?"):
            turn_done.clear()
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=content)],
                                                  parameters=params))
            assert turn_done.wait(120)

    turns, ids, text = [], [], []
    with grpc.insecure_channel(address) as ch:
        for event in pb_grpc.InferenceStub(ch).Chat(requests(), metadata=auth(key), timeout=300):
            if event.HasField("delta"):
                ids.extend(event.delta.token_ids)
                text.append(event.delta.text)
                if on_delta is not None:
                    on_delta(len(turns), len(ids))
            else:
                turns.append((tuple(ids), "".join(text), event.end.finish_reason))
                ids, text = [], []
                turn_done.set()
    return turns


def test_chat_session_moves_mid_reply_with_its_transcript(cluster):
    """The worker holding a Chat session dies while streaming a reply: the reply continues on another replica
    exactly as it would have, and the next turn (with the whole transcript) too."""
    reference = _chat_turns(cluster["router"], cluster["key"])
    killed = []

    def on_delta(turn: int, num_ids: int) -> None:
        if turn == 0 and num_ids >= 20 and not killed:
            for replica in cluster["replicas"].values():  # the one running the session's only sequence
                with grpc.insecure_channel(replica.address) as ch:
                    try:
                        load = wpb_grpc.WorkerStub(ch).Load(wpb.LoadRequest(), timeout=5)
                    except grpc.RpcError:
                        continue
                if load.num_running:
                    killed.append((replica, len(replica.events("group_serving"))))
                    os.kill(replica.events("group_started")[-1]["pids"][0], signal.SIGKILL)
                    return

    assert _chat_turns(cluster["router"], cluster["key"], on_delta) == reference
    assert killed, "no replica was found running the session"
    replica, servings = killed[0]
    replica.wait_serving(starts=servings + 1)


def test_crash_looping_replica_stays_out_and_the_router_keeps_serving(cluster, tmp_path):
    """A replica whose worker cannot start (a refused configuration) on the port the router lists: the supervisor
    backs off and gives up; meanwhile and afterwards the router serves from the others."""
    cluster["replicas"].pop("c").stop()  # its port is the one the router lists for a third replica
    looping = Replica(tmp_path, "looping", cluster["model"], "--block-size", "3", port=cluster["c_port"])
    try:
        load = asyncio.run(_run_load(cluster["router"], cluster["key"], _requests()[:30], tag="looping"))
        assert all(len(ids) == n for ids, _, _, n in load.outputs)
        assert looping.proc.wait(60) == 1
        restarts = looping.events("group_restarting")
        assert [e["backoff_s"] for e in restarts] == sorted(e["backoff_s"] for e in restarts)
        assert looping.events("crash_loop")
        assert not [e for e in _router_events(cluster, "worker_healthy")
                    if e["address"] == looping.address and e["timestamp"] > looping.events("group_started")[0]
                    ["timestamp"]]
    finally:
        looping.stop()
