"""Worker throughput vs what a transformers user gets, on the same checkpoint, in one run.

Workload (seed 0): 64 requests, prompts uniform in [16, 512] tokens, outputs uniform in [16, 256]
(EOS ignored), greedy, all submitted at once to a worker process over gRPC. Baselines: transformers
generate() in arrival-order batches of 16 (left-padded, each batch run to its longest output) and
transformers' continuous batching manager. Prints useful output tokens/s, ratios, TTFT/TPOT, memory.

    .venv/bin/python bench/worker_throughput.py [--num-requests 64] [--skip-cb]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import BenchRequest, bench_model_dir, make_workload, percentile  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2 as wpb  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc  # noqa: E402
from worker.launch import start_worker  # noqa: E402
from worker.model.dims import ModelDims  # noqa: E402


async def _one(stub, i: int, req: BenchRequest, t0: float) -> dict:
    job = wpb.Job(request_id=f"bench-{i}", token_ids=wpb.TokenIds(ids=req.prompt_token_ids),
                  parameters=pb.SamplingParameters(max_new_tokens=req.max_new_tokens, temperature=0.0,
                                                   ignore_eos=True))
    call = stub.Generate(iter([wpb.WorkerRequest(job=job)]))
    times, ids = [], []
    async for ev in call:
        delta = ev.delta if ev.HasField("delta") else ev.finished.last_delta
        if delta.token_ids:
            now = time.perf_counter()
            times.extend([now] * len(delta.token_ids))
            ids.extend(delta.token_ids)
    return {"ids": ids, "ttft": times[0] - t0, "end": times[-1],
            "tpot": (times[-1] - times[0]) / max(1, len(times) - 1)}


async def run_worker_load(address: str, work: list[BenchRequest]) -> tuple[float, list[dict]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wpb_grpc.WorkerStub(channel)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(stub, i, r, t0) for i, r in enumerate(work)))
        return time.perf_counter() - t0, results


def worker_batch1_tpot(address: str, prompt: list[int], n: int) -> float:
    """Seconds per output token of one request alone: (time for n tokens - time for 1) / (n - 1)."""
    def run(k: int) -> float:
        _, res = asyncio.run(run_worker_load(address, [BenchRequest(prompt, k)]))
        return res[0]["end"]

    def elapsed(k: int) -> float:
        t = time.perf_counter()
        run(k)
        return time.perf_counter() - t

    elapsed(2)
    return (min(elapsed(n) for _ in range(2)) - min(elapsed(1) for _ in range(2))) / (n - 1)


def hf_model(model_dir: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    # EOS ignored the way the worker's ignore_eos does it: it may be generated, it just doesn't stop the
    # sequence (min_new_tokens would instead ban it and change the tokens)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_generate_batches(model, work: list[BenchRequest], batch_size: int = 16) -> tuple[float, list[list[int]]]:
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for b in range(0, len(work), batch_size):
        chunk = work[b:b + batch_size]
        width = max(len(r.prompt_token_ids) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            n = len(r.prompt_token_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_token_ids)
            mask[i, width - n:] = 1
        new = max(r.max_new_tokens for r in chunk)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        outputs.extend(out[i, width:width + r.max_new_tokens].tolist() for i, r in enumerate(chunk))
    return time.perf_counter() - t0, outputs


@torch.inference_mode()
def hf_generate_batch1_tpot(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])

    def elapsed(k: int) -> float:
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    elapsed(2)
    return (min(elapsed(n) for _ in range(2)) - min(elapsed(1) for _ in range(2))) / (n - 1)


def hf_continuous_batching(model, work: list[BenchRequest]) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in work), do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        t0 = time.perf_counter()
        for i, r in enumerate(work):
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.max_new_tokens,
                                eos_token_id=-1)
        results: dict[str, list[int]] = {}
        while len(results) < len(work):
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("transformers continuous batching stopped early")
            results[out.request_id] = list(out.generated_tokens)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    return elapsed, [results[f"r{i}"] for i in range(len(work))]


def rss_peak_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--skip-cb", action="store_true", help="skip transformers' continuous batching baseline")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llamagrid")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    model_dir = bench_model_dir(args.cache)
    work = make_workload(args.num_requests)
    useful = sum(r.max_new_tokens for r in work)
    print(f"workload: {len(work)} requests, {sum(len(r.prompt_token_ids) for r in work)} prompt tokens, "
          f"{useful} output tokens; torch threads {torch.get_num_threads()}", flush=True)

    worker = start_worker(model_dir, "--max-num-seqs", "64", "--max-num-batched-tokens", "512",
                          "--kv-cache-tokens", str(64 * 800), "--log-level", "warning")
    try:
        asyncio.run(run_worker_load(worker.address, work[:2]))  # warm
        ours_s, ours = asyncio.run(run_worker_load(worker.address, work))
        ours_tps = useful / ours_s
        ttft = [r["ttft"] * 1e3 for r in ours]
        tpot = [r["tpot"] * 1e3 for r in ours]
        print(f"llamagrid worker: {ours_s:.1f} s, {ours_tps:.1f} output tok/s; TTFT p50 {percentile(ttft, 50):.0f} ms "
              f"p99 {percentile(ttft, 99):.0f} ms; TPOT p50 {percentile(tpot, 50):.1f} ms p99 "
              f"{percentile(tpot, 99):.1f} ms", flush=True)
        probe = work[0].prompt_token_ids[:128]
        ours_b1 = worker_batch1_tpot(worker.address, probe, 64)
        import grpc as _grpc

        with _grpc.insecure_channel(worker.address) as ch:
            info = wpb_grpc.WorkerStub(ch).Info(wpb.InfoRequest())
        rss = rss_peak_bytes(worker.proc.pid)
    finally:
        worker.stop()

    model = hf_model(model_dir)
    gen_s, gen_out = hf_generate_batches(model, work)
    gen_tps = useful / gen_s
    print(f"transformers generate() batches of 16: {gen_s:.1f} s, {gen_tps:.1f} output tok/s", flush=True)
    hf_b1 = hf_generate_batch1_tpot(model, probe, 64)
    figures = {
        "useful_output_tokens": useful,
        "worker_s": ours_s, "worker_tok_s": ours_tps,
        "generate_s": gen_s, "generate_tok_s": gen_tps,
        "ratio_vs_generate": ours_tps / gen_tps,
        "worker_batch1_ms_per_token": ours_b1 * 1e3, "generate_batch1_ms_per_token": hf_b1 * 1e3,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "kv_pool_bytes": int(info.kv_capacity_tokens) * _kv_bytes_per_token(model),
        "worker_peak_rss_bytes": rss,
    }
    mismatch_gen = sum(o["ids"] != g for o, g in zip(ours, gen_out, strict=True))
    figures["requests_differing_from_generate"] = mismatch_gen
    if not args.skip_cb:
        cb_s, cb_out = hf_continuous_batching(model, work)
        figures.update(cb_s=cb_s, cb_tok_s=useful / cb_s, ratio_vs_cb=ours_tps / (useful / cb_s),
                       requests_differing_from_cb=sum(o["ids"] != c for o, c in zip(ours, cb_out, strict=True)))
        print(f"transformers continuous batching: {cb_s:.1f} s, {useful / cb_s:.1f} output tok/s", flush=True)

    print(f"\nratio vs generate(): {figures['ratio_vs_generate']:.2f}x (target >= 2.0)")
    if "ratio_vs_cb" in figures:
        print(f"ratio vs continuous batching: {figures['ratio_vs_cb']:.2f}x (target >= 3.0)")
    print(f"batch-1 decode: worker {figures['worker_batch1_ms_per_token']:.2f} ms/token, generate() "
          f"{figures['generate_batch1_ms_per_token']:.2f} ms/token (ratio "
          f"{figures['generate_batch1_ms_per_token'] / figures['worker_batch1_ms_per_token']:.2f}x)")
    cb_diff = figures.get("requests_differing_from_cb", "n/a")
    print(f"greedy tokens differing from generate(): {mismatch_gen} of {len(work)} requests; "
          f"from continuous batching: {cb_diff}")
    print(f"KV pool {figures['kv_pool_bytes'] / 2**20:.1f} MiB, worker peak RSS {rss / 2**20:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _kv_bytes_per_token(model) -> int:
    return ModelDims.from_config(model.config).kv_bytes_per_token(4)  # float32 on the CPU


if __name__ == "__main__":
    sys.exit(main())
