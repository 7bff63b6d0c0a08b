"""n completions of one prompt against the same completions computed separately, in one run.

    .venv/bin/python bench/parallel_sampling.py [--n 4] [--prompt-tokens 1500] [--prompts 8]

An in-process worker on the bench workload's model (bench.workload). `--prompts` prompts of about
`--prompt-tokens` random tokens (seeded), each asked for `--n` sampled completions (seeded, 64 tokens):

- n: what the router sends for `n = 4` (the n jobs of a prompt on one worker at once): the worker's scheduler
  prefills the prompt once and the other completions take its blocks from the prefix cache;
- separate: the same completions as requests that cannot share (prefix caching off: what n separate requests cost
  when they land apart or before the first is cached).

Reported per side: prompt tokens computed (prompt minus cached, from each completion's usage), the most KV blocks in
use at once, wall time; then n / separate. Both sides generate the same tokens (seeded streams).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import bench_model_dir  # noqa: E402
from worker.app import Worker  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.engine import EngineRequest, FinishEvent, TokenEvent  # noqa: E402
from worker.sequence import SamplingParams  # noqa: E402


def run(worker: Worker, prompts: list[list[int]], n: int, tag: str) -> dict:
    manager = worker.engine.scheduler.block_manager
    done = threading.Event()
    lock = threading.Lock()
    state = {"left": len(prompts) * n, "computed": 0, "peak": 0, "tokens": []}

    def sink(events) -> None:
        with lock:
            state["peak"] = max(state["peak"], manager.num_used_blocks)
            for e in events:
                if isinstance(e, TokenEvent):
                    state["tokens"].extend(e.token_ids)
                elif isinstance(e, FinishEvent):
                    state["computed"] += e.num_prompt_tokens - e.num_cached_tokens
                    state["left"] -= 1
                    if state["left"] == 0:
                        done.set()

    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        for j in range(n):
            params = SamplingParams(max_new_tokens=64, temperature=0.9, seed=1000 * i + j, ignore_eos=True)
            worker.engine.submit(EngineRequest(f"{tag}-{i}-{j}", prompt, params, sink))
    assert done.wait(3600)
    return {"wall_s": time.perf_counter() - t0, "prompt_tokens_computed": state["computed"],
            "peak_blocks": state["peak"], "output_tokens": len(state["tokens"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = bench_model_dir(Path.home() / ".cache" / "llamagrid")
    rng = random.Random(args.seed)
    results = {}
    for name, caching in (("n", True), ("separate", False)):
        worker = Worker(WorkerConfig(model_dir=model, kv_cache_tokens=131072, max_num_seqs=64,
                                     enable_prefix_caching=caching))
        worker.engine.start()
        try:
            vocab = worker.tokenizer.decoder.vocab_size
            if not results:
                prompts = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt_tokens - 1)]
                           for _ in range(args.prompts)]
            run(worker, [[1, 5, 6, 7]], 1, f"{name}-warm")
            results[name] = run(worker, prompts, args.n, name)
        finally:
            worker.engine.stop()
    print(f"{args.prompts} prompts of {args.prompt_tokens} tokens, {args.n} sampled completions of 64 tokens each")
    for name, r in results.items():
        print(f"  {name:8}  prompt tokens computed {r['prompt_tokens_computed']:7d}   peak KV blocks "
              f"{r['peak_blocks']:5d}   wall {r['wall_s']:6.2f} s   ({r['output_tokens']} output tokens)")
    a, b = results["n"], results["separate"]
    print(f"n / separate: prompt tokens computed {a['prompt_tokens_computed'] / b['prompt_tokens_computed']:.3f}x, "
          f"peak KV blocks {a['peak_blocks'] / b['peak_blocks']:.3f}x, wall {a['wall_s'] / b['wall_s']:.3f}x")
    once = a["prompt_tokens_computed"] <= args.prompts * (args.prompt_tokens + (args.n - 1) * 16)
    print(f"{'PASS' if once else 'FAIL'}: each prompt prefilled once (its later completions compute at most the "
          "last partial block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
