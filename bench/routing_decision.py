"""What a cache-aware routing decision costs the router, tokenizing included, at 1 stream and at a burst of 128.

    .venv/bin/python bench/routing_decision.py [--workers 4] [--cached-blocks 100000] [--prompt-tokens 2000]

In process, on the router's own code (WorkerPool.prompt_blocks + WorkerPool.pick, as the relay calls them), against
`--workers` healthy workers whose cache views each hold `--cached-blocks` block keys: random ones plus the blocks of
8 shared documents of about `--prompt-tokens` tokens (the generated tiny model's tokenizer). Three prompt kinds:

- cached: a shared document plus a new question (its document's pieces were tokenized before: kept states);
- novel: a document nobody holds (reading stops at the first block no worker has);
- first: a held document the router's encoder has not seen yet (every piece tokenized).

At 1 stream each decision runs alone; at 128 streams, 128 decisions arrive together as 128 tasks on one event loop
(what a burst of 128 new streams asks of it): per decision, and the time until the last of them is decided. The
baseline, in the same run, is load-only routing (power of two choices, no prompt): the ratio is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prefix_routing import model_dir  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2 as wpb  # noqa: E402
from router.discovery import StaticTargets  # noqa: E402
from router.prompt_blocks import PromptEncoder  # noqa: E402
from router.worker_pool import WorkerPool, _Worker  # noqa: E402

MODEL = "bench"
DOCUMENTS = 8


def make_pool(tokenizer_json: str, workers: int, cached_blocks: int, documents: list[str],
              rng: random.Random) -> WorkerPool:
    """A pool of healthy workers (no channels: nothing is called) whose views hold the documents' blocks, each
    document on two workers, plus random keys up to `cached_blocks` per worker."""
    pool = WorkerPool(StaticTargets([]), rng=random.Random(0))
    pool.cache_routing = True
    encoder = PromptEncoder(tokenizer_json, 16)
    doc_keys = [PromptEncoder(tokenizer_json, 16).blocks(d).keys for d in documents]
    now = time.monotonic()
    for i in range(workers):
        w = _Worker(address=f"10.0.0.{i}:50061", channel=None, stub=None, serving=True,
                    info=wpb.InfoResponse(model=MODEL, max_num_seqs=64, kv_capacity_tokens=cached_blocks * 16),
                    load=wpb.LoadResponse(num_running=rng.randrange(8), num_waiting=rng.randrange(3)), load_at=now)
        keys = {rng.getrandbits(64) for _ in range(cached_blocks)}
        for d, dk in enumerate(doc_keys):
            if d % workers in (i, (i + 1) % workers):
                keys.update(dk)
        w.view.apply(wpb.CacheEvent(epoch="e", snapshot=True, stored=list(keys)[:cached_blocks], block_size=16))
        w.tokenizer = encoder.fingerprint
        pool._workers[w.address] = w
    pool._encoders[MODEL] = encoder
    pool.health_timeout_s = 1e9  # (no Load polling here: the snapshot stays healthy)
    return pool


def cache_decision(pool: WorkerPool, text: str) -> None:
    pool.pick(MODEL, prompt=pool.prompt_blocks(MODEL, text))


def load_decision(pool: WorkerPool, text: str) -> None:
    pool.pick(MODEL)


def one_stream(pool: WorkerPool, decide, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        decide(pool, t)
        out.append(time.perf_counter() - t0)
    return out


async def burst(pool: WorkerPool, decide, texts: list[str]) -> tuple[list[float], float]:
    """len(texts) decisions as tasks started together; (each decision's own time, time until the last one)."""
    own: list[float] = []
    start = time.perf_counter()

    async def one(text: str) -> None:
        t0 = time.perf_counter()
        decide(pool, text)
        own.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(t) for t in texts))
    return own, time.perf_counter() - start


def ms(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--cached-blocks", type=int, default=100_000)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--decisions", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tokenizer_json = (model_dir() / "tokenizer.json").read_text()
    corpus = (ROOT / "worker" / "model" / "tiny_corpus.txt").read_text().split()
    probe = PromptEncoder(tokenizer_json, 16)
    sample = " ".join(rng.choice(corpus) for _ in range(1000))
    words = max(1, round(args.prompt_tokens * 1000 / probe.blocks(sample).num_tokens))

    def document(n: int) -> str:
        return f"Document {n}. " + " ".join(rng.choice(corpus) for _ in range(words))

    def question() -> str:
        return " Question: " + " ".join(rng.choice(corpus) for _ in range(rng.randrange(8, 20))) + "?"

    held = [document(d) for d in range(DOCUMENTS)]
    pool = make_pool(tokenizer_json, args.workers, args.cached_blocks, held, rng)
    n = args.decisions
    # (n prompts for the 1-stream figures, then 128 others for the burst: none seen by the encoder before)
    kinds = {"cached": [rng.choice(held) + question() for _ in range(n + 128)],
             "novel": [document(1000 + i) + question() for i in range(n + 128)]}
    tokens = statistics.median(probe.blocks(t).num_tokens for t in held)
    print(f"{args.workers} workers, {args.cached_blocks:,} cached blocks each, prompts of about {tokens:.0f} tokens "
          f"({n} decisions per figure)")
    for text in held:  # the shared documents as a running router has seen them (their pieces' kept states)
        pool.prompt_blocks(MODEL, text)
    ok = True
    for kind, texts in kinds.items():
        base = one_stream(pool, load_decision, texts[:n])
        single = one_stream(pool, cache_decision, texts[:n])
        own, last = asyncio.run(burst(pool, cache_decision, texts[n:]))
        _, base_last = asyncio.run(burst(pool, load_decision, texts[n:]))
        ratio = statistics.median(single) / statistics.median(base)
        print(f"  {kind:6}  1 stream: p50 {ms(single, .5):.3f} ms  p99 {ms(single, .99):.3f} ms  "
              f"(load-only {ms(base, .5):.4f} ms: {ratio:.0f}x)   128 streams: p50 {ms(own, .5):.3f} ms, last "
              f"decided after {1e3 * last:.1f} ms (load-only {1e3 * base_last:.2f} ms), "
              f"{len(own) / last:,.0f} decisions/s")
        if kind == "cached":
            ok &= ms(single, .5) <= 1.0
    first = [document(2000 + i) for i in range(8)]
    fresh = make_pool(tokenizer_json, args.workers, 1000, first, rng)
    costs = one_stream(fresh, cache_decision, [t + question() for t in first])
    print(f"  first   (a held document the encoder has not seen): p50 {statistics.median(costs) * 1e3:.2f} ms")
    print(f"{'PASS' if ok else 'FAIL'}: cached-prefix decision p50 at 1 stream at most 1 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
