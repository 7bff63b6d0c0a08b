"""Serving benchmark: a fixed number of streamed requests at Poisson arrivals against a router or a worker.

In the style of vLLM's benchmark_serving and TGI's benchmark: `--num-requests` streamed calls over grpc.aio, a
router's GenerateStream (`llamagrid.v1.Inference`, `--target`) or a worker's own Worker.Run (its internal API, one
job per request: `--worker`, and `--self-contained`), are sent at Poisson arrivals of `--request-rate` requests/s
(`inf`: all at once), optionally capped at `--max-concurrency` in flight. Prompt and output lengths are drawn from
seeded distributions, no data downloads:

    uniform:MIN:MAX                   integers uniform in [MIN, MAX]
    fixed:N                           always N
    lognormal:MEDIAN:SIGMA:MIN:MAX    a lognormal, rounded and clamped to [MIN, MAX]
    sharegpt                          ShareGPT-like: lognormal fitted roughly to the published ShareGPT shape (vLLM
                                      paper: mean prompt ~161 tokens, mean output ~338; long right tails); prompts
                                      lognormal(median 100, sigma 1.0) in [4, 1024], outputs lognormal(median 200,
                                      sigma 1.0) in [4, 1024]

Prompts are built from plain English words (tokenizer-independent), about PROMPT_WORDS_PER_TOKEN words per wanted
token, so prompt lengths are approximate (the served prompt token counts, from each stream's final usage, are
reported); output lengths are exact: `max_new_tokens` with `ignore_eos`.

Reported: request throughput, output-token throughput, total-token throughput, TTFT, TPOT (per request:
(e2e - TTFT) / (output tokens - 1)), ITL (every gap between consecutive token-carrying chunks) and end-to-end latency
as mean / p50 / p90 / p99, and goodput: requests/s that met every `--goodput` target (e.g. `ttft_ms=500,tpot_ms=50`,
also `e2el_ms=`).

    .venv/bin/python bench/serve.py --self-contained --num-requests 16 --request-rate inf     # tiny local worker
    .venv/bin/python bench/serve.py --worker 127.0.0.1:50061 --num-requests 100 --request-rate 4   # one worker
    .venv/bin/python bench/serve.py --target 127.0.0.1:50051 --api-key "$KEY" --num-requests 500 \\
        --request-rate 8 --input-len sharegpt --output-len sharegpt --goodput ttft_ms=1000,tpot_ms=100 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import percentile  # noqa: E402

PROMPT_WORDS_PER_TOKEN = 0.75  # English text runs ~1.3 Llama tokens per word
PERCENTILES = (50, 90, 99)
GOODPUT_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
SHAREGPT_INPUT = (100.0, 1.0, 4, 1024)  # median, sigma, min, max
SHAREGPT_OUTPUT = (200.0, 1.0, 4, 1024)

# common short English words: a tokenizer-independent vocabulary for prompts
_WORDS_TEXT = (
    "the of and to in is was that for on as with his they at be this from have or by one had not but what all were "
    "when we there can an your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my made "
    "over did down only way find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why things help put "
    "years different away again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while might next sound below "
    "saw something thought both few those always looked show large often together asked house world going want "
    "school important until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story boys since white days "
    "ever paper hard near sentence better best across during today others however sure means knew try told young "
    "miles sun ways thing whole hear example heard several change answer room sea against top turned learn point "
    "city play toward five using himself usually money seen car morning river train valley station green market"
)
WORDS = tuple(_WORDS_TEXT.split())


# ---- workload


def length_sampler(spec: str, kind: str = "input") -> Callable[[random.Random], int]:
    """A length sampler from a spec (see the module docstring); `sharegpt` is the prompt (kind="input") or the
    output (kind="output") shape. Raises ValueError on a bad spec."""
    name, *args = spec.strip().split(":")
    try:
        nums = [float(a) for a in args]
    except ValueError as exc:
        raise ValueError(f"bad length spec {spec!r}: {exc}") from None
    if name == "fixed" and len(nums) == 1 and nums[0] >= 1:
        n = int(nums[0])
        return lambda rng: n
    if name == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        lo, hi = int(nums[0]), int(nums[1])
        return lambda rng: rng.randint(lo, hi)
    if name == "sharegpt" and not nums:
        return _lognormal(*(SHAREGPT_INPUT if kind == "input" else SHAREGPT_OUTPUT))
    if name == "lognormal" and len(nums) == 4 and nums[0] > 0 and nums[1] >= 0 and 1 <= nums[2] <= nums[3]:
        return _lognormal(*nums)
    raise ValueError(f"bad length spec {spec!r}: expected uniform:MIN:MAX, fixed:N, "
                     "lognormal:MEDIAN:SIGMA:MIN:MAX or sharegpt")


def _lognormal(median: float, sigma: float, lo: float, hi: float) -> Callable[[random.Random], int]:
    mu = math.log(median)
    return lambda rng: int(min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))))


def make_prompt(rng: random.Random, approx_tokens: int) -> str:
    n = max(1, round(approx_tokens * PROMPT_WORDS_PER_TOKEN))
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    approx_prompt_tokens: int
    max_new_tokens: int
    arrival_s: float  # offset from the start of the run


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Poisson process: exponential gaps of mean 1/rate from t=0 (the first request at 0); rate inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be positive (or inf)")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def make_requests(n: int, input_spec: str, output_spec: str, rate: float, seed: int) -> list[Request]:
    """The seeded request list: the same arguments always give the same prompts, lengths and arrivals."""
    rng = random.Random(seed)
    inputs, outputs = length_sampler(input_spec, "input"), length_sampler(output_spec, "output")
    lens = [(inputs(rng), outputs(rng)) for _ in range(n)]
    arrivals = arrival_times(n, rate, random.Random(seed + 1))
    return [Request(i, make_prompt(random.Random(f"{seed}/{i}"), p), p, o, a)
            for i, ((p, o), a) in enumerate(zip(lens, arrivals, strict=True))]


# ---- metrics


@dataclass
class Result:
    """One request as the client saw it; times are perf_counter seconds."""

    index: int
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying tokens
    end: float = 0.0  # the stream finished (after its last chunk)
    output_tokens: int = 0
    prompt_tokens: int = 0
    expected_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e_s(self) -> float:
        return self.end - self.start

    @property
    def tpot_s(self) -> float | None:
        """(e2e - TTFT) / (n - 1); None for a single-token output."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def parse_goodput(spec: str | None) -> dict[str, float]:
    """`ttft_ms=500,tpot_ms=50` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in GOODPUT_KEYS or not value:
            raise ValueError(f"bad goodput target {part!r}: expected KEY=MS with KEY in {GOODPUT_KEYS}")
        out[key] = float(value)
        if out[key] <= 0:
            raise ValueError(f"goodput target {key} must be positive")
    return out


def _stats(values_ms: list[float]) -> dict[str, float]:
    out = {"mean": sum(values_ms) / len(values_ms) if values_ms else float("nan")}
    out.update({f"p{p}": percentile(values_ms, p) for p in PERCENTILES})
    return out


def meets(r: Result, targets: dict[str, float]) -> bool:
    if not r.ok:
        return False
    tpot = r.tpot_s
    got = {"ttft_ms": r.ttft_s * 1e3, "tpot_ms": 0.0 if tpot is None else tpot * 1e3, "e2el_ms": r.e2e_s * 1e3}
    return all(got[k] <= v for k, v in targets.items())


def compute_metrics(results: list[Result], duration_s: float, goodput: dict[str, float] | None = None) -> dict:
    """Aggregate figures of a run that took duration_s (first send to last completion)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    m = {
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "short_outputs": sum(1 for r in ok if r.expected_tokens and r.output_tokens != r.expected_tokens),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else float("nan"),
        "output_throughput": out_tokens / duration_s if duration_s > 0 else float("nan"),
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else float("nan"),
        "ttft_ms": _stats([r.ttft_s * 1e3 for r in ok]),
        "tpot_ms": _stats([r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]),
        "itl_ms": _stats([g * 1e3 for r in ok for g in r.itl_s]),
        "e2el_ms": _stats([r.e2e_s * 1e3 for r in ok]),
    }
    if goodput:
        good = sum(1 for r in results if meets(r, goodput))
        m["goodput"] = {"targets": dict(goodput), "good_requests": good,
                        "request_goodput": good / duration_s if duration_s > 0 else float("nan"),
                        "fraction": good / len(results) if results else float("nan")}
    errors = sorted({r.error for r in results if r.error})
    if errors:
        m["errors"] = errors[:8]
    return m


# ---- load


async def _send(stub, req: Request, model: str, metadata, temperature: float, timeout_s: float,
                is_worker: bool = False) -> Result:
    from protos.llamagrid.v1 import inference_pb2 as pb

    params = pb.SamplingParameters(max_new_tokens=req.max_new_tokens, temperature=temperature, ignore_eos=True)
    res = Result(req.index, expected_tokens=req.max_new_tokens)
    res.start = time.perf_counter()
    try:
        messages = (_worker_messages if is_worker else _public_messages)(stub, req, model, params, metadata,
                                                                          timeout_s)
        async for num_tokens, usage in messages:
            now = time.perf_counter()
            if num_tokens:
                res.chunk_times.append(now)
                res.output_tokens += num_tokens
            if usage is not None:
                res.prompt_tokens = usage.prompt_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the run goes on
        res.error = f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()} {_details(exc)}".strip()
    res.end = time.perf_counter()
    if not res.error and not res.chunk_times:
        res.error = "no tokens streamed"
    return res


async def _public_messages(stub, req: Request, model: str, params, metadata, timeout_s: float):
    """(tokens carried, usage or None) of each chunk of a router's GenerateStream."""
    from protos.llamagrid.v1 import inference_pb2 as pb

    call = stub.GenerateStream(pb.GenerateRequest(model=model, inputs=[req.prompt], parameters=params),
                               metadata=metadata, timeout=timeout_s)
    async for chunk in call:
        yield len(chunk.token_ids), chunk.usage if chunk.HasField("usage") else None


async def _worker_messages(stub, req: Request, model: str, params, metadata, timeout_s: float):
    """(tokens carried, usage or None) of each event of a worker's Worker.Run."""
    from protos.llamagrid.worker.v1 import worker_pb2 as wpb

    job = wpb.Job(request_id=f"serve-{req.index}-{uuid.uuid4().hex[:8]}", model=model, text=req.prompt,
                  parameters=params)
    async for event in stub.Run(job, metadata=metadata, timeout=timeout_s):
        if event.HasField("delta"):
            yield len(event.delta.token_ids), None
        else:
            yield len(event.finished.last_delta.token_ids), event.finished.usage


def _details(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    return (details() or "") if callable(details) else str(exc)[:200]


async def run_load(address: str, requests: list[Request], *, api_key: str | None = None, model: str = "",
                   max_concurrency: int | None = None, temperature: float = 0.0, timeout_s: float = 600.0,
                   channels: int = 1, warmup: int = 1, is_worker: bool = False) -> tuple[list[Result], float, str]:
    """Send the requests at their arrival offsets; returns (results, duration, served model name). is_worker: the
    address is a worker's, spoken to over its Worker API (else a router's public API)."""
    import grpc

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    chans = [grpc.aio.insecure_channel(address, options=opts) for _ in range(max(1, channels))]
    stubs = [_stub(c, is_worker) for c in chans]
    try:
        model = model or await _served_model(stubs[0], metadata, is_worker)

        async def send(stub, req: Request) -> Result:
            return await _send(stub, req, model, metadata, temperature, timeout_s, is_worker)

        for w in range(warmup):  # connections, the worker's first-step costs
            r = await send(stubs[0], Request(-1, make_prompt(random.Random(f"warmup/{w}"), 16), 16, 4, 0.0))
            if r.error:
                raise RuntimeError(f"warm-up request failed: {r.error}")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        t0 = time.perf_counter()

        async def one(req: Request) -> Result:
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                return await send(stubs[req.index % len(stubs)], req)

        results = await asyncio.gather(*(one(r) for r in requests))
        duration = max((r.end for r in results), default=t0) - t0
        return list(results), duration, model
    finally:
        for c in chans:
            await c.close()


def _stub(channel, is_worker: bool):
    if is_worker:
        from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc

        return wpb_grpc.WorkerStub(channel)
    from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc

    return pb_grpc.InferenceStub(channel)


async def _served_model(stub, metadata, is_worker: bool) -> str:
    """The worker's model (Worker.Info), or the router's first listed one (ListModels)."""
    if is_worker:
        from protos.llamagrid.worker.v1 import worker_pb2 as wpb

        return (await stub.Info(wpb.InfoRequest(), metadata=metadata, timeout=30)).model
    from protos.llamagrid.v1 import inference_pb2 as pb

    resp = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
    return resp.models[0].name if resp.models else ""


# ---- report


def print_report(m: dict, header: str) -> None:
    print(f"\n{'=' * 16} {header} {'=' * 16}")
    rows = [
        ("Successful requests", f"{m['completed']} of {m['requests']}"),
        ("Benchmark duration (s)", f"{m['duration_s']:.2f}"),
        ("Total input tokens (served)", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]
    if "goodput" in m:
        g = m["goodput"]
        targets = ",".join(f"{k}<={v:g}" for k, v in g["targets"].items())
        rows.append(("Request goodput (req/s)", f"{g['request_goodput']:.2f}"))
        rows.append((f"  good requests ({targets})", f"{g['good_requests']} ({100 * g['fraction']:.0f}%)"))
    for label, value in rows:
        print(f"{label:<46}{value:>16}")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        s = m[key]
        print(f"{label + ' (ms)':<18}" + "".join(f"{k:>5} {v:>10.2f}" for k, v in s.items()))
    if m.get("short_outputs"):
        print(f"warning: {m['short_outputs']} request(s) streamed fewer tokens than max_new_tokens "
              "(context full or clamped)")
    for e in m.get("errors", []):
        print(f"error: {e}")


# ---- self-contained worker


@contextlib.contextmanager
def local_worker(extra_args: list[str], log_level: str = "warning"):
    """A tiny generated model (seed 0) served by one worker process; yields its address, stops it on exit."""
    from worker.launch import start_worker
    from worker.model.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="llamagrid-serve-"))
    worker = None
    try:
        model_dir = make_tiny_model(tmp / "tiny-llama", seed=0)
        with open(tmp / "worker.log", "w") as log:
            worker = start_worker(model_dir, *extra_args, "--log-level", log_level, stderr=log)
            yield worker.address
    finally:
        if worker is not None:
            worker.stop(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="host:port of a router (its public API)")
    where.add_argument("--worker", help="host:port of a worker (its internal Worker API; no API key)")
    where.add_argument("--self-contained", action="store_true",
                       help="start a tiny generated model worker locally and benchmark it (Worker API)")
    ap.add_argument("--api-key", default=None, help="router API key (sent as authorization: Bearer)")
    ap.add_argument("--model", default="", help="served model name (default: the first ListModels entry, or the "
                                                "worker's model)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second; inf = all "
                    "at once")
    ap.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    ap.add_argument("--input-len", default="sharegpt", help="prompt length distribution (approximate tokens)")
    ap.add_argument("--output-len", default="sharegpt", help="output length distribution (exact tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goodput", default=None, help="SLO targets, e.g. ttft_ms=500,tpot_ms=50[,e2el_ms=...]")
    ap.add_argument("--channels", type=int, default=1, help="gRPC connections the requests share")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request deadline in seconds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests sent first")
    ap.add_argument("--worker-args", default="", help="--self-contained: extra worker flags (one string)")
    ap.add_argument("--json", type=Path, default=None, help="also write config, metrics and per-request data here")
    args = ap.parse_args(argv)
    try:
        goodput = parse_goodput(args.goodput)
        requests = make_requests(args.num_requests, args.input_len, args.output_len, args.request_rate, args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    if args.num_requests < 1:
        ap.error("--num-requests must be positive")
    approx_in = sum(r.approx_prompt_tokens for r in requests)
    out_total = sum(r.max_new_tokens for r in requests)
    print(f"{len(requests)} requests, rate {args.request_rate} req/s, input {args.input_len} (~{approx_in} tokens), "
          f"output {args.output_len} ({out_total} tokens), seed {args.seed}", flush=True)

    async def go(address: str, is_worker: bool):
        return await run_load(address, requests, api_key=args.api_key, model=args.model,
                              max_concurrency=args.max_concurrency, temperature=args.temperature,
                              timeout_s=args.timeout, channels=args.channels, warmup=args.warmup,
                              is_worker=is_worker)

    if args.self_contained:
        longest = max(r.approx_prompt_tokens * 2 + r.max_new_tokens for r in requests)
        kv = max(16384, min(len(requests), 256) * longest)
        worker_args = ["--kv-cache-tokens", str(kv), "--max-num-seqs", str(max(64, min(len(requests), 256))),
                       *args.worker_args.split()]
        with local_worker(worker_args) as address:
            print(f"self-contained: tiny worker at {address}", flush=True)
            results, duration, model = asyncio.run(go(address, is_worker=True))
    else:
        results, duration, model = asyncio.run(go(args.worker or args.target, is_worker=bool(args.worker)))
    metrics = compute_metrics(results, duration, goodput)
    print_report(metrics, f"Serving benchmark ({model or 'default model'})")
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
        config["request_rate"] = str(args.request_rate)
        per_request = [{**{k: v for k, v in asdict(r).items() if k != "chunk_times"},
                        "ttft_ms": r.ttft_s * 1e3 if r.chunk_times else None,
                        "tpot_ms": r.tpot_s * 1e3 if r.ok and r.tpot_s is not None else None,
                        "e2el_ms": r.e2e_s * 1e3} for r in results]
        args.json.write_text(json.dumps({"config": config, "model": model, "metrics": metrics,
                                         "requests": per_request}, indent=2))
    return 0 if metrics["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
