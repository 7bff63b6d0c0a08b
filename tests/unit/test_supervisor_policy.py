"""The supervisor's pure parts: exit classification, backoff, crash-loop window, heartbeat files, argv split."""

from __future__ import annotations

import os
import signal
import time

import pytest

from worker.heartbeat import read_heartbeats
from worker.supervisor.__main__ import split_argv
from worker.supervisor.causes import Failure, classify_exit
from worker.supervisor.group import is_alive
from worker.supervisor.policy import Backoff, CrashLoop
from worker.supervisor.supervisor import SupervisorConfig, WorkerCommand


@pytest.mark.parametrize(("returncode", "expected"), [
    (86, Failure("oom", 0, exit_code=86)),
    (1, Failure("crash", 0, exit_code=1)),
    (3, Failure("crash", 0, exit_code=3)),
    (0, Failure("exit", 0, exit_code=0)),
    (-signal.SIGKILL, Failure("killed", 0, signal="SIGKILL")),
    (-signal.SIGSEGV, Failure("crash", 0, signal="SIGSEGV")),
    (-signal.SIGTERM, Failure("crash", 0, signal="SIGTERM")),
])
def test_classify_exit(returncode, expected):
    assert classify_exit(returncode) == expected


def test_only_hung_killed_or_other_rank_skip_the_sigterm():
    assert Failure("hung", 0).needs_sigkill and Failure("killed", 0).needs_sigkill
    assert Failure("crash", 1).needs_sigkill
    assert not Failure("oom", 0, exit_code=86).needs_sigkill and not Failure("exit", 0).needs_sigkill


def test_backoff_doubles_to_cap_and_resets_after_stable_serving():
    b = Backoff(0.5, 4.0, stable_after_s=60)
    assert [b.next_delay(None) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next_delay(59.0) == 4.0  # served, but not stably
    assert b.next_delay(60.0) == 0.5
    assert b.next_delay(None) == 1.0


def test_crash_loop_counts_failures_in_window():
    loop = CrashLoop(max_failures=3, window_s=10)
    assert not loop.record(0.0) and not loop.record(5.0)
    assert not loop.record(10.5)  # the failure at 0.0 left the window
    assert loop.num_recent == 2
    assert loop.record(11.0)


def test_read_heartbeats(tmp_path):
    (tmp_path / "rank0.heartbeat").write_text(f"{os.getpid()}\n")
    (tmp_path / "rank1.heartbeat").write_text("")  # half-written: skipped
    (tmp_path / "rank2.heartbeat.tmp99").write_text("99")
    (tmp_path / "port").write_text("5000")
    os.utime(tmp_path / "rank0.heartbeat", (1000.0, 1000.0))
    assert read_heartbeats(tmp_path) == {0: (os.getpid(), 1000.0)}


def test_is_alive_checks_the_process_group():
    assert is_alive(os.getpid(), os.getpgid(0))
    assert not is_alive(os.getpid(), os.getpgid(0) + 1)  # a reused PID in another group is not our rank
    assert not is_alive(2 ** 22 + 1, os.getpgid(0))


def test_split_argv():
    assert split_argv(["--heartbeat-timeout", "3", "--", "--model", "m"]) == (["--heartbeat-timeout", "3"],
                                                                             ["--model", "m"])
    assert split_argv(["--model", "m"]) == ([], ["--model", "m"])
    assert split_argv(["-h"]) == (["-h"], [])


def test_worker_command_fixes_the_port_once(tmp_path):
    cmd = WorkerCommand.from_args(["--model", "m", "--port", "0", "--port-file", str(tmp_path / "p")])
    assert cmd.port > 0 and cmd.num_ranks == 1 and cmd.port_file == tmp_path / "p"
    argv = cmd.argv(tmp_path / "start-1")
    assert argv[-2:] == ["--run-dir", str(tmp_path / "start-1")]

    def last(flag: str) -> str:  # argparse: the last occurrence wins
        return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]

    assert last("--port") == str(cmd.port)
    assert last("--port-file") == str(tmp_path / "start-1" / "port")
    assert WorkerCommand.from_args(["--model", "m", "--port", "7000"]).port == 7000


def test_config_is_validated():
    with pytest.raises(ValueError, match="backoff"):
        SupervisorConfig(backoff_initial_s=10, backoff_max_s=1)
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        SupervisorConfig(heartbeat_timeout_s=0)


def test_stale_ranks_counts_a_missing_file_from_serving(tmp_path):
    from unittest.mock import Mock

    from worker.supervisor.group import SupervisedGroup

    group = SupervisedGroup(Mock(pid=os.getpid()), tmp_path, num_ranks=2)
    (tmp_path / "rank0.heartbeat").write_text(str(os.getpid()))
    now = time.time()
    assert group.stale_ranks(5.0, since=now) == {}
    assert set(group.stale_ranks(5.0, since=now - 6)) == {1}
    os.utime(tmp_path / "rank0.heartbeat", (now - 100, now - 100))  # not touched while loading
    assert group.stale_ranks(5.0, since=now) == {}
    assert group.stale_ranks(5.0, since=now - 6) == {0: pytest.approx(6, abs=1), 1: pytest.approx(6, abs=1)}


def test_llamagrid_worker_dispatch(monkeypatch):
    import worker.__main__
    import worker.supervisor.__main__
    from llamagrid.cli import main

    calls = []
    monkeypatch.setattr(worker.__main__, "main", lambda argv: calls.append(("worker", argv)) or 0)
    monkeypatch.setattr(worker.supervisor.__main__, "main", lambda argv: calls.append(("supervisor", argv)) or 0)
    main(["worker", "--model", "m", "--port", "0"])
    main(["worker", "--supervise", "--heartbeat-timeout", "3", "--", "--model", "m"])
    main(["worker", "--model", "m", "--supervise"])
    main(["worker", "--", "--supervise"])  # after `--` it is a worker arg (which the worker refuses)
    assert calls == [("worker", ["--model", "m", "--port", "0"]),
                     ("supervisor", ["--heartbeat-timeout", "3", "--", "--model", "m"]),
                     ("supervisor", ["--model", "m"]),
                     ("worker", ["--", "--supervise"])]
