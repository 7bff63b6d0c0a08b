"""Heartbeat files (worker.heartbeat) and the tensor-parallel start-up checks (worker.tp.group)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from worker.heartbeat import MIN_INTERVAL_S, Heartbeat, heartbeat_path, read_heartbeats
from worker.tp.group import check_tp_config


def test_heartbeat_file_holds_the_pid(tmp_path):
    Heartbeat(tmp_path / "run", 3)
    assert heartbeat_path(tmp_path / "run", 3).read_text() == str(os.getpid())
    assert read_heartbeats(tmp_path / "run") == {3: (os.getpid(), pytest.approx(time.time(), abs=5))}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_beat_is_throttled_then_touches(tmp_path):
    clock = FakeClock()
    beat = Heartbeat(tmp_path, 0, clock=clock)
    path = heartbeat_path(tmp_path, 0)
    os.utime(path, (1000.0, 1000.0))
    clock.now += MIN_INTERVAL_S / 2
    beat.beat()  # within MIN_INTERVAL_S of the first write: nothing
    assert path.stat().st_mtime == 1000.0
    clock.now += MIN_INTERVAL_S  # past the interval
    beat.beat()
    assert path.stat().st_mtime > time.time() - 5


def test_beat_rewrites_a_removed_file(tmp_path):
    clock = FakeClock()
    beat = Heartbeat(tmp_path, 1, clock=clock)
    heartbeat_path(tmp_path, 1).unlink()
    clock.now += MIN_INTERVAL_S
    beat.beat()
    assert read_heartbeats(tmp_path)[1][0] == os.getpid()


def test_read_heartbeats_skips_other_and_broken_files(tmp_path):
    (tmp_path / "rank0.heartbeat").write_text("123")
    (tmp_path / "rank1.heartbeat").write_text("")  # half-written
    (tmp_path / "rank2.heartbeat.tmp99").write_text("5")
    (tmp_path / "notes.txt").write_text("x")
    assert set(read_heartbeats(tmp_path)) == {0}
    assert read_heartbeats(tmp_path / "missing") == {}


def _config(heads=32, kv_heads=8, vocab=32000, inter=11008):
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                           intermediate_size=inter, hidden_size=4096, num_hidden_layers=32)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_llama_shapes_divide(tp):
    check_tp_config(_config(), tp, torch.device("cpu"))


def test_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match=r"--tp 16 cannot shard this model: its key/value heads \(8\) is not"):
        check_tp_config(_config(), 16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"attention heads \(32\), key/value heads \(8\), vocabulary size"):
        check_tp_config(_config(), 3, torch.device("cpu"))


def test_refuses_more_ranks_than_gpus():
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        if torch.cuda.device_count() >= 2:
            pytest.skip("this machine has two GPUs")
        check_tp_config(_config(), 2, torch.device("cuda"))
