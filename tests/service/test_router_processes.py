"""`python -m router --processes 2`: two router processes on one port (SO_REUSEPORT) under a parent that merges
their /metrics, starts again one that dies and stops them all on SIGTERM. Real processes, real gRPC over sockets,
a real redis-server, a scripted fake worker.

The kernel hands each TCP connection to one process, so the tests open a fresh connection per call (a local
subchannel pool per channel) and tell the processes apart by the `process` label of the merged metrics. The first
five tests share one router, and the fifth stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import grpc
import pytest

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import PROCESSES_ENV
from tests.support.fake_model import Script
from tests.support.logs import json_events
from tests.support.metrics import scrape
from tests.support.router import ROOT, RouterProcess, auth, create_keys, log_problems
from tests.support.waits import wait_until

PARAMS = pb.SamplingParameters(max_new_tokens=4, temperature=0.0, ignore_eos=True)
GENERATE = "/llamagrid.v1.Inference/Generate"
LIST_MODELS = "/llamagrid.v1.Inference/ListModels"
PROCESSES = ("0", "1")
PARENT_OWN = {"llamagrid_router_processes", "llamagrid_router_process_restarts"}


@dataclass
class Cluster:
    router: RouterProcess
    metrics_port: int
    key: str

    def metrics(self) -> dict[str, list]:
        return scrape(self.metrics_port)

    def per_process(self, sample: str, **labels: str) -> dict[str, float]:
        """process label -> the sum of the samples named `sample` with `labels`, from the parent's /metrics."""
        out: dict[str, float] = {}
        for samples in self.metrics().values():
            for s in samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[s.labels["process"]] = out.get(s.labels["process"], 0.0) + s.value
        return out

    def call(self, method: str = "Generate"):
        """One call on a connection of its own (so the kernel picks a process for it afresh)."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.router.address, options=options) as ch:
            stub = pb_grpc.InferenceStub(ch)
            if method == "ListModels":
                return stub.ListModels(pb.ListModelsRequest(), metadata=auth(self.key), timeout=10)
            return stub.Generate(pb.GenerateRequest(inputs=["hello there"], parameters=PARAMS),
                                 metadata=auth(self.key), timeout=10)

    def wait_every_process_routable(self, timeout_s: float = 20.0) -> None:
        """Until both processes serve and each one's pool has seen the worker healthy."""
        wait_until(lambda: self.per_process("llamagrid_router_workers", healthy="true") == {"0": 1.0, "1": 1.0},
                   "both router processes to see the fake worker healthy", timeout_s,
                   describe=lambda: self.per_process("llamagrid_router_workers"))

    def pids(self) -> dict[int, int]:
        """Process index -> the pid of its latest process, from the parent's log."""
        return {e["process"]: e["pid"] for e in self.router.events("router_process_started")}


@pytest.fixture(scope="module")
def cluster(redis_server, module_fakes, tmp_path_factory):
    worker = module_fakes.start(Script(token_delay_s=0.0))
    key = create_keys(redis_server.url, {"pro": ("pro", [])})["pro"]
    metrics_port = free_port()
    log_path = tmp_path_factory.mktemp("router-processes") / "router.stderr"
    router = RouterProcess(log_path, "--processes", "2", "--workers", worker.address, "--redis-url",
                           redis_server.url, "--metrics-port", str(metrics_port), "--drain-grace", "2",
                           "--router-heartbeat", "0.5")
    c = Cluster(router, metrics_port, key)
    try:
        c.wait_every_process_routable()
        yield c
    finally:
        router.stop()


def test_one_port_spreads_connections_over_both_processes_which_share_the_router_registry(cluster):
    before = cluster.per_process("llamagrid_router_requests_total", method=LIST_MODELS)

    def both_reached():
        assert cluster.call("ListModels").models
        now = cluster.per_process("llamagrid_router_requests_total", method=LIST_MODELS)
        return all(now.get(p, 0) > before.get(p, 0) for p in PROCESSES)

    wait_until(both_reached, "calls on fresh connections to reach both processes", 30)
    # each process counts itself and the other in Redis' registry of live routers (the parent serves no calls and
    # is not in it), so each takes half of a tier's per-key caps
    wait_until(lambda: cluster.per_process("llamagrid_router_routers_alive") == {"0": 2.0, "1": 2.0},
               "each process to count 2 routers alive", 10)
    families = cluster.metrics()
    assert families["llamagrid_router_processes"][0].value == 2
    for name, samples in families.items():  # (a labelled family that counted nothing yet has no samples)
        if name not in PARENT_OWN:
            assert all(s.labels.get("process") in PROCESSES for s in samples), name


def test_merged_metrics_add_up_to_the_calls_made(cluster):
    def totals() -> tuple[float, float]:
        calls = cluster.per_process("llamagrid_router_requests_total", method=GENERATE, code="OK")
        tokens = cluster.per_process("llamagrid_router_completion_tokens_total")
        return sum(calls.values()), sum(tokens.values())

    calls0, tokens0 = totals()
    num_calls = 12
    for _ in range(num_calls):
        assert cluster.call().outputs[0].usage.completion_tokens == PARAMS.max_new_tokens
    wait_until(lambda: totals() == (calls0 + num_calls, tokens0 + num_calls * PARAMS.max_new_tokens),
               f"the merged counters to count {num_calls} more calls", 10, describe=totals)
    # one family per name, each process's series once: what a Prometheus `sum without (process)` adds up
    families = cluster.metrics()
    for name, samples in families.items():
        keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples]
        assert len(keys) == len(set(keys)), name


def test_a_process_that_does_not_answer_is_left_out_of_the_scrape(cluster):
    stopped = cluster.pids()[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        families = cluster.metrics()  # (waits out the parent's scrape timeout for process 1)
    finally:
        os.kill(stopped, signal.SIGCONT)
    labelled = {s.labels.get("process") for name, samples in families.items() if name not in PARENT_OWN
                for s in samples}
    assert labelled == {"0"}, "a process that did not answer has no samples, neither stale nor zero"
    cluster.router.wait_event("router_process_scrape_failed", where=lambda e: e["process"] == 1)
    wait_until(lambda: set(cluster.per_process("llamagrid_router_requests_total")) == set(PROCESSES),
               "process 1's samples to be back once it answers", 10)


def test_a_killed_process_is_started_again_while_the_port_keeps_serving(cluster):
    victim = cluster.pids()[1]
    os.kill(victim, signal.SIGKILL)
    cluster.router.wait_event("router_process_exited", where=lambda e: e["process"] == 1 and e["exit_code"] == -9)
    for _ in range(5):  # process 0 takes every new connection until process 1 is back (after a backoff)
        assert cluster.call().outputs[0].usage.completion_tokens == PARAMS.max_new_tokens
    cluster.router.wait_event("router_process_serving", where=lambda e: e["process"] == 1 and e["restarts"] == 1)
    assert cluster.pids()[1] != victim
    cluster.wait_every_process_routable()
    families = cluster.metrics()
    assert families["llamagrid_router_processes"][0].value == 2
    restarts = {s.labels["process"]: s.value for s in families["llamagrid_router_process_restarts"]
                if s.name.endswith("_total")}
    assert restarts == {"0": 0.0, "1": 1.0}
    before = cluster.per_process("llamagrid_router_requests_total", method=GENERATE, code="OK").get("1", 0.0)

    def new_process_serves():
        assert cluster.call().outputs[0].usage.completion_tokens == PARAMS.max_new_tokens
        return cluster.per_process("llamagrid_router_requests_total", method=GENERATE, code="OK").get("1", 0) > before

    wait_until(new_process_serves, "calls on fresh connections to reach the new process 1", 30)


def test_sigterm_to_the_parent_drains_and_stops_every_process(cluster):
    """The last test of the shared router: it stops it."""
    pids = cluster.pids()
    assert cluster.router.stop(30) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):  # exited and reaped by the parent
            os.kill(pid, 0)
    stopped = cluster.router.events("router_stopped")
    assert sorted(e["process"] for e in stopped[-2:]) == [0, 1]
    assert cluster.router.events("router_processes_stopped")[-1]["failed"] == 0
    assert not log_problems(cluster.router.log_text())


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_processes_leave_when_their_parent_is_killed(redis_server, module_fakes, tmp_path):
    worker = module_fakes.start()
    router = RouterProcess(tmp_path / "router.stderr", "--processes", "2", "--workers", worker.address,
                           "--redis-url", redis_server.url, "--drain-grace", "1")
    pids = [e["pid"] for e in router.events("router_process_started")]
    router.proc.kill()
    router.proc.wait()
    wait_until(lambda: all(_gone(pid) for pid in pids), "the orphaned router processes to exit", 15)
    assert sorted(e["process"] for e in router.events("router_process_orphaned")) == [0, 1]


def test_a_port_in_use_fails_the_start_and_a_bad_count_is_refused(tmp_path):
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: no process may join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "router", "--processes", "2", "--port", str(port),
                               "--workers", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed = json_events(proc.stderr, "router_process_failed_to_start")
    assert failed and failed[0]["exit_code"] != 0
    for argv, env in ((["--processes", "0"], {}), ([], {PROCESSES_ENV: "many"})):
        proc = subprocess.run([sys.executable, "-m", "router", *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=60)
        assert proc.returncode == 2 and "must be an integer >= 1" in proc.stderr, proc.stderr
