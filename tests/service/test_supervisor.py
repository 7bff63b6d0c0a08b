"""The supervisor with real worker processes on the tiny model: restart after kill -9, a crash loop that gives up,
no process left behind when the supervisor stops or is killed, a hung rank, and repeated OOM. A dead rank of a TP
group restarting the whole group under load: test_failover.py."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support import metrics
from tests.support.metrics import value
from tests.support.supervised import START_TIMEOUT_S, Supervised, group_processes
from tests.support.waits import wait_until


def wait_for(predicate, timeout: float = START_TIMEOUT_S, interval: float = 0.1):
    return wait_until(predicate, getattr(predicate, "__name__", "a condition"), timeout, interval)


def health(port: int) -> int | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return None


def run_job(port: int, request_id: str, max_new_tokens: int) -> wpb.Finished:
    """One job through Worker.Run on the replica at port; its Finished."""
    job = wpb.Job(request_id=request_id, text="hello",
                  parameters=pb.SamplingParameters(max_new_tokens=max_new_tokens, ignore_eos=True))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return list(wpb_grpc.WorkerStub(ch).Run(job, timeout=60))[-1].finished


@pytest.fixture()
def supervise(tmp_path, tiny_model_dir):
    started: list[Supervised] = []

    def start(*options: str, worker_args: list[str] = (), **kw) -> Supervised:
        s = Supervised(tmp_path, tiny_model_dir, list(options), list(worker_args), **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def test_kill9_restarts_group_on_same_port_and_sigterm_stops_it(supervise):
    """`llamagrid worker --supervise`: kill -9 of the group restarts it on the same port, the supervisor's /metrics
    count it by cause; then SIGTERM stops the group (drained) and the supervisor, leaving nothing."""
    metrics_port = free_port()
    sup = supervise("--metrics-port", str(metrics_port), via_cli=True)
    port = sup.port
    old_pgid = sup.wait_serving(1)
    assert health(port) == health_pb2.HealthCheckResponse.SERVING
    m = metrics.scrape(metrics_port)
    assert value(m, "llamagrid_supervisor_group_starts_total") == 1
    assert value(m, "llamagrid_supervisor_group_serving") == 1

    killed_at = time.monotonic()
    os.kill(old_pgid, signal.SIGKILL)
    wait_for(lambda: health(port) != health_pb2.HealthCheckResponse.SERVING, timeout=30)
    wait_for(lambda: health(port) == health_pb2.HealthCheckResponse.SERVING, interval=0.05)
    print(f"\nkill -9 -> SERVING again on port {port}: {time.monotonic() - killed_at:.2f} s")

    failed = sup.events("group_failed")[0]
    assert (failed["cause"], failed["signal"], failed["rank"]) == ("killed", "SIGKILL", 0), sup.log_tail()
    assert sup.events("group_restarting")[0]["backoff_s"] == 0.2
    new_pgid = sup.wait_serving(2)
    assert new_pgid != old_pgid and sup.port == port
    assert group_processes(old_pgid) == []  # killed and reaped while the supervisor still runs
    assert run_job(port, "after-restart", 4).usage.completion_tokens == 4
    assert sup.proc.poll() is None
    m = metrics.scrape(metrics_port)
    assert value(m, "llamagrid_supervisor_group_starts_total") == 2
    assert value(m, "llamagrid_supervisor_group_failures_total", cause="killed") == 1
    assert value(m, "llamagrid_supervisor_restarts_total", cause="killed") == 1
    assert value(m, "llamagrid_supervisor_restarts_total", cause="crash") == 0
    assert value(m, "llamagrid_supervisor_group_serving") == 1
    assert value(m, "llamagrid_supervisor_crash_looped") == 0

    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(90) == 0, sup.log_tail()
    assert group_processes(new_pgid) == []
    assert health(port) is None
    assert sup.events("supervisor_stopping")[0]["signal"] == "SIGTERM"
    assert sup.events("group_stopped")[-1]["exit_code"] == 0, sup.log_tail()  # rank 0 drained and exited
    assert len(sup.events("group_failed")) == 1  # the kill -9 only: the stop was no failure


def test_crash_loop_gives_up(supervise):
    # the worker refuses this config at once (exit status 2); the supervisor only checks that the flags parse
    sup = supervise("--crash-loop-max-failures", "3", "--crash-loop-window", "300", "--backoff-initial", "0.05",
                    worker_args=["--block-size", "3"])
    assert sup.proc.wait(START_TIMEOUT_S) == 1, sup.log_tail()
    failures = sup.events("group_failed")
    assert [(f["cause"], f["exit_code"]) for f in failures] == [("crash", 2)] * 3, sup.log_tail()
    assert [e["backoff_s"] for e in sup.events("group_restarting")] == [0.05, 0.1]
    loop = sup.events("crash_loop")[0]
    assert (loop["level"], loop["failures"], loop["last_cause"]) == ("error", 3, "crash")
    assert not sup.port_file.exists()


def test_hung_rank_is_killed_and_restarted_and_a_killed_supervisor_takes_its_group_down(supervise):
    sup = supervise("--heartbeat-timeout", "3")
    port = sup.port
    pgid = sup.wait_serving(1)
    os.kill(pgid, signal.SIGSTOP)  # stops every thread: the heartbeat goes stale, the exit status never comes
    failed = sup.wait_event("group_failed", timeout=60)
    assert (failed["cause"], failed["rank"]) == ("hung", 0), sup.log_tail()
    assert failed["heartbeat_age_s"] > 3
    new_pgid = sup.wait_serving(2)
    assert group_processes(pgid) == []
    assert health(port) == health_pb2.HealthCheckResponse.SERVING
    # kill -9 of the supervisor itself: its group goes down with it
    sup.proc.kill()
    sup.proc.wait()
    wait_for(lambda: not [p for p in group_processes(new_pgid) if not p.endswith(" Z")], timeout=30)


def test_repeated_oom_restarts_with_cause_oom(supervise):
    from worker.faults import OOM_EXIT_CODE

    sup = supervise(worker_args=["--inject-fault", "oom@step=3,times=100"],
                    env={"LLAMAGRID_ALLOW_FAULT_INJECTION": "1"})
    wait_for(lambda: sup.events("group_serving") or sup.events("group_failed"))
    if not sup.events("group_failed"):  # warm-up took steps 1-2: a request reaches step 3
        with contextlib.suppress(grpc.RpcError):
            run_job(sup.port, "into-the-oom", 8)
    failed = sup.wait_event("group_failed", timeout=60)
    assert (failed["cause"], failed["exit_code"]) == ("oom", OOM_EXIT_CODE), sup.log_tail()
    sup.wait_event("group_started", count=2)
