"""Engine behaviour end to end on the tiny model: leaks, cancellation, stop strings, streaming text, cache events."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from tests.engine_utils import make_worker, run_all, submit
from tests.support.waits import wait_until
from worker.cache_events import StreamEnded, Subscriber
from worker.sequence import FinishReason, SamplingParams


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = make_worker(tiny_model_dir, kv_cache_tokens=1024, block_size=16, max_num_batched_tokens=128,
                    max_num_seqs=16)
    yield w
    w.engine.stop()


def wait_for(predicate, what: str, timeout: float = 30.0):
    return wait_until(predicate, what, timeout)


def wait_idle(worker, timeout: float = 30.0) -> None:
    s = worker.engine.scheduler
    wait_for(lambda: not s.has_unfinished and worker.engine.load.num_running == 0, "the engine to go idle", timeout)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_load_with_cancels_leaks_no_blocks(worker, seed):
    """Many random requests, some cancelled mid-stream: afterwards every block is free again."""
    rng = random.Random(seed)
    results, cancelled = [], set()
    for i in range(40):
        n = rng.randint(1, 200)
        prompt = [1] + [rng.randrange(3, 1000) for _ in range(n - 1)]
        params = SamplingParams(max_new_tokens=rng.randint(1, 60), temperature=rng.choice([0.0, 0.8]),
                                seed=rng.randrange(1000), ignore_eos=rng.random() < 0.5,
                                stop=tuple(rng.sample(["a", "e", "th", "ing"], rng.randint(0, 2))))
        result = submit(worker, f"leak{seed}-{i}", prompt, params)
        results.append(result)
        if rng.random() < 0.3:
            # cancelled at once (maybe before it is scheduled), or once it has streamed a few tokens
            num_tokens = rng.choice([0, 1, 3])
            wait_for(lambda r=result, n=num_tokens: len(r.token_ids) >= n or r.done.is_set(),
                     f"{num_tokens} tokens of leak{seed}-{i}", timeout=120)
            worker.engine.abort(f"leak{seed}-{i}")
            cancelled.add(i)
    for r in results:
        assert r.done.wait(120) and r.error is None
    wait_idle(worker)
    bm = worker.engine.scheduler.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
    reasons = {r.finish_reason for i, r in enumerate(results) if i in cancelled}
    assert FinishReason.CANCELLED in reasons or not cancelled


def test_stop_string_split_across_tokens_is_caught(worker):
    prompt = [1, 450, 871, 300, 77, 812]
    base = run_all(worker, [prompt], SamplingParams(max_new_tokens=40, ignore_eos=True), prefix="stop-base")[0]
    decoder = worker.tokenizer.decoder
    pieces = [decoder.stream().push(t) for t in base.token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    cut = base.text.find(stop)
    got = run_all(worker, [prompt], SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,)),
                  prefix="stop-run")[0]
    assert got.finish_reason == FinishReason.STOP
    assert got.text == base.text[:cut]
    assert stop not in got.text


def test_deltas_concatenate_to_text_with_multibyte_output(worker):
    """Byte-fallback tokens (multi-byte UTF-8) stream as whole characters; deltas add up to the text."""
    hf = worker.tokenizer.hf
    prompt = hf("Ελληνικά 中文 🙂 café", add_special_tokens=True)["input_ids"]
    results = run_all(worker, [prompt] * 4, [SamplingParams(max_new_tokens=48, temperature=1.2, seed=s,
                                                            ignore_eos=True) for s in range(4)],
                      prefix="mb")
    for r in results:
        assert "".join(r.deltas) == r.text
        for d in r.deltas:
            d.encode("utf-8")  # every delta is valid UTF-8 on its own
        full = hf.decode(prompt + r.token_ids, skip_special_tokens=True)
        head = hf.decode(prompt, skip_special_tokens=True)
        assert full.startswith(head) and full[len(head):] == r.text


def test_unschedulable_request_fails_alone(worker):
    """A request the scheduler refuses (here: longer than the pool allows) fails; the engine keeps going."""
    too_long = SamplingParams(max_new_tokens=worker.layout.max_context + 10)
    bad = submit(worker, "unschedulable", [1, 5, 6], too_long)
    assert bad.done.wait(30) and bad.error is not None
    ok = run_all(worker, [[1, 5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True), prefix="after-bad")[0]
    assert ok.finish_reason == FinishReason.LENGTH


class _View:
    """One cache subscriber's view, built on a loop of its own thread from the snapshot and the batches alone."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.subscriber = Subscriber(loop)
        self.keys: set[int] = set()
        self.num_batches = self.num_evicted = 0
        self.following = asyncio.run_coroutine_threadsafe(self._follow(), loop)

    async def _follow(self) -> None:
        first = await self.subscriber.next()
        assert first.snapshot and not first.evicted
        self.keys = set(first.stored)
        while True:
            try:
                batch = await self.subscriber.next()
            except StreamEnded:
                return
            assert not batch.snapshot and (batch.stored or batch.evicted)
            assert not set(batch.stored) & set(batch.evicted)
            self.keys = (self.keys - set(batch.evicted)) | set(batch.stored)
            self.num_batches += 1
            self.num_evicted += len(batch.evicted)


def test_cache_subscribers_joining_under_load_each_see_the_exact_cache(worker):
    """Subscribers that join while the engine steps (shared prefixes: hits; a small pool: evictions) each end with
    the cache itself: a snapshot and the batches after it miss nothing and repeat nothing. A reset empties them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    views: list[_View] = []
    try:
        rng = random.Random(5)
        bases = [[1] + [rng.randrange(3, 1000) for _ in range(40)] for _ in range(3)]
        results = []
        views.append(_View(loop))
        worker.engine.subscribe_cache(views[0].subscriber)
        for i in range(24):
            tail = [rng.randrange(3, 1000) for _ in range(rng.randint(1, 80))]
            prompt = rng.choice(bases)[: rng.randint(1, 41)] + tail
            results.append(submit(worker, f"cache-events-{i}", prompt,
                                  SamplingParams(max_new_tokens=rng.randint(5, 20), ignore_eos=True)))
            if i % 6 == 5:  # joins between two steps of these six
                wait_for(lambda: any(r.token_ids for r in results[-6:]), "the engine to be stepping", 60)
                views.append(_View(loop))
                worker.engine.subscribe_cache(views[-1].subscriber)
        for r in results:
            assert r.done.wait(120) and r.error is None
        wait_idle(worker)
        bm = worker.engine.scheduler.block_manager
        cached = set(bm.cached_block_keys())  # the engine is idle: the cache holds still
        wait_for(lambda: all(v.keys == cached for v in views), "every view to match the cache")
        assert worker.engine.cache_events.num_subscribers == len(views) == 5 and views[0].num_evicted > 0
        assert cached
        worker.engine.reset_prefix_cache()
        wait_for(lambda: not any(v.keys for v in views), "every view to empty after a reset")
        assert bm.cached_block_keys() == []
    finally:
        for v in views:
            v.subscriber.end(StreamEnded())
            v.following.result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    wait_for(lambda: worker.engine.cache_events.num_subscribers == 0, "the ended subscribers to be dropped")
