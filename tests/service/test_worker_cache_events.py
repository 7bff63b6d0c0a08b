"""Worker.Tokenizer and Worker.CacheEvents on a real worker (the session's tiny workers): a caller that tokenizes
with the worker's tokenizer.json names the blocks the worker then caches, each subscriber's stream starts with the
whole cache, the subscriber gauge counts open streams, and both RPCs need the internal token where one is set."""

from __future__ import annotations

import threading
import uuid

import grpc
import pytest
from tokenizers import Tokenizer as FastTokenizer

from common.block_hash import prompt_block_keys
from common.internal_auth import TOKEN_METADATA
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.metrics import scrape, value
from tests.support.waits import wait_until
from tests.support.workers import INTERNAL_TOKEN

GREEDY = pb.SamplingParameters(max_new_tokens=6, temperature=0.0, ignore_eos=True)
SUBSCRIBERS = "llamagrid_worker_cache_event_subscribers"


class Follower:
    """One CacheEvents stream read on a thread of its own into a set of keys, as a router keeps its view."""

    def __init__(self, internal: wpb_grpc.WorkerStub) -> None:
        self.call = internal.CacheEvents(wpb.CacheEventsRequest(), timeout=120)
        self.first: wpb.CacheEvent | None = None
        self.keys: set[int] = set()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                if self.first is None:
                    assert event.snapshot
                    self.first = event
                else:
                    assert not event.snapshot and event.epoch == self.first.epoch
                self.keys = (self.keys - set(event.evicted)) | set(event.stored)
        except grpc.RpcError as exc:
            self.error = exc

    def stop(self) -> None:
        self.call.cancel()
        self._thread.join(10)


def _run(internal: wpb_grpc.WorkerStub, **job) -> tuple[list[int], pb.Usage]:
    """Worker.Run of one job: its generated token ids and its usage."""
    events = list(internal.Run(wpb.Job(request_id=f"cache-events-{uuid.uuid4().hex}", parameters=GREEDY, **job),
                               timeout=60))
    finished = events[-1].finished
    ids = [t for e in events[:-1] for t in e.delta.token_ids] + list(finished.last_delta.token_ids)
    return ids, finished.usage


def _subscribers(port: int) -> float:
    return value(scrape(port), SUBSCRIBERS)


def test_the_workers_tokenizer_names_the_blocks_its_cache_events_report(internal, real_workers):
    metrics_port = real_workers[0].metrics_port
    before = _subscribers(metrics_port)
    tokenizer = internal.Tokenizer(wpb.TokenizerRequest(), timeout=10)
    block_size = tokenizer.block_size
    assert block_size == internal.Info(wpb.InfoRequest(), timeout=10).block_size
    text = f"{uuid.uuid4().hex} " + "the quick brown fox jumps over the lazy dog, " * 8 + "é 中文 🙂 café"
    ids = FastTokenizer.from_str(tokenizer.tokenizer_json).encode(text, add_special_tokens=True).ids
    keys = prompt_block_keys(ids, block_size)
    assert len(keys) >= 4

    first = Follower(internal)
    second = None
    try:
        wait_until(lambda: first.first is not None or first.error, "the first stream's snapshot")
        assert first.error is None and first.first.block_size == block_size and first.first.epoch
        assert not set(keys) & first.keys  # a prompt no job sent before
        by_text, usage = _run(internal, text=text)
        assert usage.prompt_tokens == len(ids) and usage.cached_prompt_tokens == 0
        wait_until(lambda: set(keys) <= first.keys, "the prompt's blocks in the stream's view",
                   describe=lambda: (len(set(keys) & first.keys), len(keys), first.error))
        # the same ids sent as Job.token_ids: the same prompt (every cacheable block a hit) and the same output
        by_ids, usage = _run(internal, token_ids=wpb.TokenIds(ids=ids))
        assert by_ids == by_text and usage.prompt_tokens == len(ids)
        assert usage.cached_prompt_tokens == len(keys) * block_size
        # a new subscriber's snapshot holds them, under the same epoch
        second = Follower(internal)
        wait_until(lambda: second.first is not None or second.error, "the second stream's snapshot")
        assert set(keys) <= set(second.first.stored) and second.first.epoch == first.first.epoch
        wait_until(lambda: _subscribers(metrics_port) == before + 2, "the gauge to count both streams")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert first.error.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: _subscribers(metrics_port) == before, "the gauge to drop the cancelled streams")


def test_tokenizer_and_cache_events_need_the_internal_token(token_worker):
    with grpc.insecure_channel(token_worker.address) as ch:
        stub = wpb_grpc.WorkerStub(ch)
        calls = {
            "Tokenizer": lambda md: stub.Tokenizer(wpb.TokenizerRequest(), metadata=md, timeout=10),
            "CacheEvents": lambda md: next(stub.CacheEvents(wpb.CacheEventsRequest(), metadata=md, timeout=10)),
        }
        for name, call in calls.items():
            for md in ((), ((TOKEN_METADATA, "wrong-token-wrong-token"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        good = ((TOKEN_METADATA, INTERNAL_TOKEN),)
        assert stub.Tokenizer(wpb.TokenizerRequest(), metadata=good, timeout=10).tokenizer_json
        stream = stub.CacheEvents(wpb.CacheEventsRequest(), metadata=good, timeout=10)
        assert next(stream).snapshot
        stream.cancel()
