"""GPU benchmark: our engine against the memory-bandwidth floor and transformers, in one run (< 8 min).

For each shape (random bf16 weights, seeded):
  llama2-7b            hidden 4096, 32 layers, 32 heads / 32 KV heads, intermediate 11008, vocab 32000 (13.5 GB)
  llama2-70b-tp8-rank  one tensor-parallel rank of Llama-2-70B at TP=8 as a single-GPU stand-in: hidden 8192,
                       80 layers, 8 query heads and 1 KV head (head_dim 128), intermediate 3584, vocab 32000/8 = 4000
                       (worker.model.parallel shards the embedding and LM head over the vocabulary) (~17 GB)
the phases are, each timed, budgeted and in its own try/except (a failure is recorded, the others still run):
  build       weights generated on the device; `--weights memory` (default on GPU) loads the same tensors into our
              model (worker.model.loader's meta-device build) and into transformers' LlamaForCausalLM;
              `--weights disk` writes a real HF checkpoint (config.json + safetensors + the tiny generator's
              tokenizer) and loads both from it (the worker's own loader path)
  logits      our logits vs transformers' on a few prompts, every position: top-1 agreement and max |diff| of
              log-softmax (bf16 tolerance)
  bandwidth   device-to-device copy of a 2 GiB buffer timed with CUDA events: (read + write bytes) / time
  hf_decode   transformers generate(): eager at batch 1, static cache (compiled, as transformers auto-compiles
              static-cache decoding) at batch 32: ms per decode step (7B only by default)
  hf_throughput  the 256-request workload (prompts 32..512, 128 outputs, seed 0) in arrival-order batches of 32,
              static cache, prompts left-padded to 512 so every batch has the same shapes (no recompiles)
  decode      our ModelRunner + Scheduler (what the worker runs), CUDA graphs on: ms per decode step at batch
              1, 8, 32, 128 (prompt 128); then eager at batch 1 and 128 with each decode attention, the gather
              path ("1_eager") and FlexAttention reading the pool in place ("1_flex", --decode-attention flex);
              floor per step = (weight bytes + KV bytes read) / measured bandwidth
  throughput  our Engine (the worker's engine thread) on the same 256 requests, all submitted at once
Writes a JSON report (--out) and prints the acceptance checks as PASS/FAIL:
  batch-1 decode <= 1.25x floor (7B); throughput >= 3x transformers static-cache generate() at batch 32 (7B);
  logits match transformers (top-1 agreement >= 0.95, max |log-softmax diff| <= 0.5).
`--dry-run`: tiny shapes, float32 on CPU, every phase at small sizes (exercises the code paths; < 1 min).

    python bench/gpu.py --out gpu.json                 # one H100/H200
    python bench/gpu.py --dry-run --out /tmp/dry.json  # CPU smoke run

Status of the GPU features this measures: bf16 weights and KV cache (--dtype auto on CUDA), the KV pool sized from
free GPU memory (worker.kv_sizing.plan_kv_cache, --kv-memory-fraction) and decode CUDA graphs per (batch bucket,
context bucket) in worker/cuda_graphs.py (--cuda-graphs), tested on CPU only. Decode attention
gathers each sequence's blocks into a padded buffer before SDPA by default (worker.model.attention): at batch 128
and ~600-token contexts that gather moves several times the weight bytes per step. `--decode-attention flex`
(worker.model.flex_decode) reads the pool in place with FlexAttention instead; it is tested on CPU (where it is
about 8x slower than the gather, so off) and is to be chosen by the decode phase's "_eager" vs "_flex" rows here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import percentile  # noqa: E402
from worker.model.dims import ModelDims  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      head_dim=128, intermediate_size=11008, vocab_size=32000),
    "llama2-70b-tp8-rank": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=8,
                                num_key_value_heads=1, head_dim=128, intermediate_size=3584, vocab_size=32000 // 8),
}
DRY_SHAPES = {
    "llama2-7b": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=32, intermediate_size=256, vocab_size=1024),
    "llama2-70b-tp8-rank": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=32, intermediate_size=96, vocab_size=1024),
}
FULL = dict(decode_batches=[1, 8, 32, 128], decode_prompt=128, decode_steps=32, requests=256, prompt_range=(32, 512),
            output_len=128, hf_batch=32, logit_prompts=[17, 64, 200, 511], copy_bytes=2 << 30, budget_s=450.0)
DRY = dict(decode_batches=[1, 2, 4], decode_prompt=16, decode_steps=3, requests=8, prompt_range=(8, 32),
           output_len=8, hf_batch=4, logit_prompts=[5, 19], copy_bytes=16 << 20, budget_s=120.0)
B1_FLOOR_RATIO = 1.25
THROUGHPUT_RATIO = 3.0
TOP1_MIN, LOGPROB_DIFF_MAX = 0.95, 0.5


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_config(shape: dict, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(architectures=["LlamaForCausalLM"], hidden_act="silu", max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, dtype=str(dtype).removeprefix("torch."), **shape)


def weight_shapes(c) -> dict[str, tuple[int, ...]]:
    dims = ModelDims.from_config(c)
    h, d, i = c.hidden_size, dims.head_dim, c.intermediate_size
    out = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,),
           "lm_head.weight": (c.vocab_size, h)}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (dims.num_heads * d, h),
                    p + "self_attn.k_proj.weight": (dims.num_kv_heads * d, h),
                    p + "self_attn.v_proj.weight": (dims.num_kv_heads * d, h),
                    p + "self_attn.o_proj.weight": (h, dims.num_heads * d),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return out


def random_weights(c, dtype: torch.dtype, device: torch.device, seed: int):
    """(HF name, tensor) pairs, generated on the device: unit-variance activations, logits of std ~4."""
    gen = torch.Generator(device=device)
    for k, (name, shape) in enumerate(weight_shapes(c).items()):
        gen.manual_seed(seed * 1_000_003 + k)
        if len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        std = 1.0 if "embed" in name else (4.0 if name == "lm_head.weight" else 1.0) / math.sqrt(shape[1])
        if "o_proj" in name or "down_proj" in name:
            std /= math.sqrt(2 * c.num_hidden_layers)  # keep the residual stream from growing with depth
        yield name, (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def tokenizer_dir(root: Path, vocab_size: int) -> Path:
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(root / "tokenizer", vocab_size=vocab_size, num_shards=1)


def build(name: str, shape: dict, args, device: torch.device, dtype: torch.dtype, root: Path):
    """(our model, transformers' model, checkpoint-or-tokenizer dir, HF config)."""
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from worker.model.llama import LlamaForCausalLM
    from worker.model.loader import _materialize, load_model

    c = hf_config(shape, dtype)
    tok = tokenizer_dir(root / name, c.vocab_size)
    if args.weights == "disk":
        from safetensors.torch import save_file

        ckpt = root / name / "checkpoint"
        ckpt.mkdir(parents=True, exist_ok=True)
        c.save_pretrained(ckpt)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(tok / f, ckpt / f)
        shard, index, n = {}, {}, 0

        def flush():
            nonlocal shard, n
            if shard:
                fname = f"model-{n:05d}.safetensors"
                save_file(shard, str(ckpt / fname), metadata={"format": "pt"})
                index.update({k: fname for k in shard})
                shard, n = {}, n + 1

        size = 0
        for wname, t in random_weights(c, dtype, device, args.seed):
            shard[wname] = t.cpu()
            size += t.numel() * t.element_size()
            if size > 2 << 30:
                flush()
                size = 0
        flush()
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        ours = load_model(ckpt, dtype=dtype, device=device)
        hf = HFLlama.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa").to(device).eval()
        return ours, hf, ckpt, c
    weights = dict(random_weights(c, dtype, device, args.seed))
    with torch.device("meta"):
        ours = LlamaForCausalLM(c)
        hf = HFLlama(c)
    _materialize(ours, device, dtype)
    ours.load_weights(weights.items())
    hf.load_state_dict(weights, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(c, device=device)
    hf.config._attn_implementation = "sdpa"
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"transformers' model kept meta tensors: {left[:4]}")
    del weights
    return ours.eval(), hf.eval(), tok, c


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- phases


def phase_logits(ours, hf, c, cfg, device) -> dict:
    from worker.model_runner import ModelRunner
    from worker.tp.plan import StepPlan

    bs = 16
    longest = max(cfg["logit_prompts"])
    runner = ModelRunner(ours, num_blocks=(longest + bs - 1) // bs, block_size=bs,
                         dtype=next(ours.parameters()).dtype, device=device)
    rng = random.Random(1)
    agree, total, max_diff, diffs = 0, 0, 0.0, []
    for n in cfg["logit_prompts"]:
        ids = [1] + [rng.randrange(3, c.vocab_size) for _ in range(n - 1)]
        blocks = (n + bs - 1) // bs
        plan = StepPlan(torch.tensor(ids), torch.arange(n), torch.arange(n), [n], [n],
                        torch.arange(blocks)[None, :], torch.arange(n))
        mine = runner.execute(plan).float()
        with torch.inference_mode():
            theirs = hf(torch.tensor([ids], device=device)).logits[0].float()
        lp_a, lp_b = torch.log_softmax(mine, -1), torch.log_softmax(theirs, -1)
        d = (lp_a - lp_b).abs()
        max_diff = max(max_diff, d.max().item())
        diffs.append(d.mean().item())
        agree += (mine.argmax(-1) == theirs.argmax(-1)).sum().item()
        total += n
    del runner
    top1 = agree / total
    return {"positions": total, "top1_agreement": top1, "max_abs_logprob_diff": max_diff,
            "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "pass": top1 >= TOP1_MIN and max_diff <= LOGPROB_DIFF_MAX}


def phase_bandwidth(cfg, device) -> dict:
    n = cfg["copy_bytes"] // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    iters = 20
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    bw = 2 * src.numel() * src.element_size() * iters / seconds  # read + write
    return {"buffer_bytes": src.numel() * src.element_size(), "bytes_per_s": bw, "tb_per_s": bw / 1e12}


def make_requests(cfg, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    out = []
    for _ in range(cfg["requests"]):
        n = rng.randint(*cfg["prompt_range"])
        out.append(([1] + [rng.randrange(3, vocab) for _ in range(n - 1)], cfg["output_len"]))
    return out


class StepTimer:
    """A logits processor that timestamps every generation step (after a device sync)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def ms_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]  # skip prefill
        return percentile(gaps, 50) * 1e3 if gaps else float("nan")


def _hf_generate(hf, ids, mask, new: int, static: bool, device, timer=None, dry=False):
    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
        if dry:
            kw["disable_compile"] = True
    if timer is not None:
        kw["logits_processor"] = LogitsProcessorList([timer])
    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=mask, **kw)


def phase_hf_decode(hf, c, cfg, device, dry) -> dict:
    rng = random.Random(2)
    out = {}
    runs = (("eager_b1", 1, False), (f"static_compiled_b{cfg['hf_batch']}", cfg["hf_batch"], True))
    for label, batch, static in runs:
        ids = torch.tensor([[1] + [rng.randrange(3, c.vocab_size) for _ in range(cfg["decode_prompt"] - 1)]
                            for _ in range(batch)], device=device)
        mask = torch.ones_like(ids)
        steps = cfg["decode_steps"] + 2
        t = time.perf_counter()
        _hf_generate(hf, ids, mask, steps, static, device, dry=dry)  # warm-up (and compile)
        warm_s = time.perf_counter() - t
        timer = StepTimer(device)
        _hf_generate(hf, ids, mask, steps, static, device, timer, dry=dry)
        out[label] = {"batch": batch, "ms_per_step": timer.ms_per_step(), "warmup_s": warm_s,
                      "tokens_per_s": batch * 1e3 / timer.ms_per_step()}
    return out


def phase_hf_throughput(hf, requests, cfg, device, budget: Budget, dry) -> dict:
    width = cfg["prompt_range"][1]
    b = cfg["hf_batch"]
    useful = sum(n for _, n in requests)
    t0 = time.perf_counter()
    done = 0
    for k in range(0, len(requests), b):
        chunk = requests[k:k + b]
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        _hf_generate(hf, ids.to(device), mask.to(device), max(n for _, n in chunk), True, device, dry=dry)
        done += sum(n for _, n in chunk)
        if budget.left < 30 and k + b < len(requests):
            break  # out of time: report the rate of the batches run
    sync(device)
    wall = time.perf_counter() - t0
    return {"batch": b, "requests": len(requests), "completed_tokens": done, "useful_tokens": useful,
            "wall_s_incl_first_compile": wall, "tokens_per_s": done / wall}


def _runner_stack(ours, c, cfg, device, dtype, tok_dir, *, num_seqs: int, max_tokens: int, graphs: bool,
                  fraction: float):
    from worker.config import WorkerConfig
    from worker.kv_cache import BlockManager
    from worker.kv_sizing import plan_kv_cache
    from worker.model_runner import ModelRunner
    from worker.scheduler import Scheduler, SchedulerConfig

    wc = WorkerConfig(model_dir=tok_dir, max_num_seqs=num_seqs, max_num_batched_tokens=max_tokens,
                      kv_memory_fraction=fraction)
    layout = plan_kv_cache(wc, c, dtype, device)
    runner = ModelRunner(ours, num_blocks=layout.num_blocks, block_size=layout.block_size,
                         dtype=dtype, device=device, cuda_graphs=graphs, max_num_seqs=num_seqs,
                         max_context=layout.max_context)
    scheduler = Scheduler(SchedulerConfig(num_seqs, max_tokens, layout.max_context),
                          BlockManager(layout.num_blocks, layout.block_size, True))
    return runner, scheduler, layout


def phase_decode(ours, c, cfg, device, dtype, tok_dir, bandwidth: float | None, budget: Budget) -> dict:
    from worker.model.flex_decode import FlexDecode
    from worker.sequence import SamplingParams, Sequence

    weight_bytes = param_bytes(ours)
    kv_per_token = ModelDims.from_config(c).kv_bytes_per_token(dtype.itemsize)
    biggest = max(cfg["decode_batches"])
    runner, scheduler, layout = _runner_stack(ours, c, cfg, device, dtype, tok_dir, num_seqs=biggest,
                                              max_tokens=4096, graphs=device.type == "cuda", fraction=0.5)
    out = {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "kv_pool_tokens":
           layout.num_blocks * layout.block_size, "cuda_graphs": runner.graphs is not None, "batches": {}}
    rng = random.Random(3)
    # graphs (gather attention captured), then eager gather vs eager FlexAttention in place at the smallest and
    # largest batch: which decode attention wins is read from "<b>_eager" vs "<b>_flex"
    ends = sorted({min(cfg["decode_batches"]), biggest})
    runs = [(b, "graphs") for b in cfg["decode_batches"]] + [(b, m) for b in ends for m in ("eager", "flex")]
    flex = FlexDecode(layout.num_blocks, layout.block_size, biggest, device)
    for b, mode in runs:
        key = f"{b}{'' if mode == 'graphs' else '_' + mode}"
        if budget.left < 20:
            out["batches"][key] = {"skipped": "time budget"}
            continue
        saved = runner.graphs
        if mode != "graphs":
            runner.graphs = None
        if mode == "flex":
            ours.model.flex_decode = flex
        try:
            steps = cfg["decode_steps"]
            warm = 3
            params = SamplingParams(max_new_tokens=warm + steps + 2, ignore_eos=True)
            seqs = [Sequence(f"d{b}-{i}", [1] + [rng.randrange(3, c.vocab_size)
                                                 for _ in range(cfg["decode_prompt"] - 1)], params, frozenset({2}))
                    for i in range(b)]
            for s in seqs:
                scheduler.add(s)
            times, kv_read = [], []
            while scheduler.has_unfinished:
                batch = scheduler.schedule()
                decode = all(e.num_new_tokens == 1 for e in batch.entries) and len(batch.entries) == b
                sync(device)
                t = time.perf_counter()
                sampled = runner.run(batch)
                sync(device)
                if decode:
                    times.append(time.perf_counter() - t)
                    kv_read.append(sum(e.start + 1 for e in batch.entries) * kv_per_token)
                scheduler.update(batch, sampled)
            times, kv_read = times[warm:warm + steps], kv_read[warm:warm + steps]
            ms = percentile([x * 1e3 for x in times], 50)
            r = {"batch": b, "graphs": runner.graphs is not None, "attention": "flex" if mode == "flex" else "gather",
                 "steps": len(times), "ms_per_step": ms,
                 "tokens_per_s": b * 1e3 / ms, "kv_bytes_per_step": sum(kv_read) / max(1, len(kv_read))}
            if bandwidth:
                r["floor_ms"] = (weight_bytes + r["kv_bytes_per_step"]) / bandwidth * 1e3
                r["ratio_to_floor"] = ms / r["floor_ms"]
            out["batches"][key] = r
            scheduler.block_manager.reset_prefix_cache()
        finally:
            runner.graphs = saved
            ours.model.flex_decode = None
    if runner.graphs is not None:
        out["graph_stats"] = runner.graphs.stats()
    del runner, scheduler
    return out


def phase_throughput(ours, c, cfg, device, dtype, tok_dir, requests, budget: Budget) -> dict:
    from worker.engine import Engine, EngineRequest, ErrorEvent, FinishEvent, TokenEvent
    from worker.sequence import SamplingParams
    from worker.tokenizer import Tokenizer

    num_seqs = 128 if device.type == "cuda" else 8
    runner, scheduler, layout = _runner_stack(ours, c, cfg, device, dtype, tok_dir, num_seqs=num_seqs,
                                              max_tokens=2048 if device.type == "cuda" else 256,
                                              graphs=device.type == "cuda", fraction=0.6)
    tokenizer = Tokenizer(tok_dir, c.vocab_size)
    engine = Engine(scheduler, runner, tokenizer.decoder, tokenizer.eos_token_ids)
    lock = threading.Lock()
    done = threading.Event()
    state = {"finished": 0, "errors": 0, "tokens": 0, "first": {}, "end": {}}

    def sink_for(rid: str):
        def sink(events):
            now = time.perf_counter()
            with lock:
                for e in events:
                    if isinstance(e, TokenEvent) and e.token_ids:
                        state["tokens"] += len(e.token_ids)
                        state["first"].setdefault(rid, now)
                    elif isinstance(e, (FinishEvent, ErrorEvent)):
                        state["finished"] += 1
                        state["errors"] += isinstance(e, ErrorEvent)
                        state["end"][rid] = now
                if state["finished"] == len(requests) + 1:
                    done.set()
        return sink

    engine.start()
    try:
        # warm-up request (graph captures of the small buckets happen during the run itself)
        engine.submit(EngineRequest("warm", requests[0][0], SamplingParams(max_new_tokens=4, ignore_eos=True),
                                    sink_for("warm")))
        while state["finished"] < 1:
            time.sleep(0.01)
        with lock:
            state["tokens"] = 0
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(requests):
            engine.submit(EngineRequest(f"r{i}", p, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                        sink_for(f"r{i}")))
        finished = done.wait(max(5.0, budget.left - 10))
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    ttft = [(state["first"][k] - t0) * 1e3 for k in state["first"] if k != "warm"]
    r = {"requests": len(requests), "completed": state["finished"] - 1, "errors": state["errors"],
         "output_tokens": state["tokens"], "wall_s": wall, "tokens_per_s": state["tokens"] / wall,
         "finished_in_budget": finished, "ttft_ms_p50": percentile(ttft, 50), "kv_pool_tokens":
         layout.num_blocks * layout.block_size, "max_num_seqs": num_seqs}
    if runner.graphs is not None:
        r["graph_stats"] = runner.graphs.stats()
    del engine, runner, scheduler
    return r


def run_phase(report: dict, name: str, fn, budget: Budget, min_left: float = 5.0):
    if budget.left < min_left:
        report[name] = {"skipped": f"time budget ({budget.left:.0f} s left)"}
        return None
    t = time.monotonic()
    try:
        result = fn()
        if isinstance(result, dict):
            result["phase_s"] = round(time.monotonic() - t, 2)
        report[name] = result
        print(f"  {name}: done in {time.monotonic() - t:.1f} s", flush=True)
        return result
    except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(f"  {name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_shape(name, shape, s, args, cfg, device, dtype, root, bandwidth, shape_budget) -> None:
    """Every phase of one shape into report section s; the models are freed on return."""
    on_gpu = device.type == "cuda"
    built = run_phase(s, "build", lambda: dict(zip(("ours", "hf", "dir", "config"),
                                                   build(name, shape, args, device, dtype, root), strict=True)),
                      shape_budget)
    if built is None:
        return
    ours, hf, tok_dir, c = built.pop("ours"), built.pop("hf"), built.pop("dir"), built.pop("config")
    built["weight_bytes"] = param_bytes(ours)
    run_phase(s, "logits", lambda: phase_logits(ours, hf, c, cfg, device), shape_budget)
    requests = make_requests(cfg, c.vocab_size)
    with_hf = name in args.hf_shapes.split(",")
    if with_hf:
        run_phase(s, "hf_decode", lambda: phase_hf_decode(hf, c, cfg, device, args.dry_run), shape_budget,
                  min_left=60 if on_gpu else 5)
        run_phase(s, "hf_throughput", lambda: phase_hf_throughput(hf, requests, cfg, device, shape_budget,
                                                                  args.dry_run),
                  shape_budget, min_left=60 if on_gpu else 5)
    hf = None  # frees transformers' copy (the lambdas above share this cell)
    free_memory(device)
    run_phase(s, "decode", lambda: phase_decode(ours, c, cfg, device, dtype, tok_dir, bandwidth, shape_budget),
              shape_budget)
    free_memory(device)
    if with_hf:
        run_phase(s, "throughput", lambda: phase_throughput(ours, c, cfg, device, dtype, tok_dir, requests,
                                                            shape_budget), shape_budget, min_left=20 if on_gpu else 3)


def checks(report: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    m = report["shapes"].get("llama2-7b", {})
    b1 = m.get("decode", {}).get("batches", {}).get("1", {})
    if "ratio_to_floor" in b1:
        out.append(("7B batch-1 decode <= 1.25x bandwidth floor", b1["ratio_to_floor"] <= B1_FLOOR_RATIO,
                    f"{b1['ms_per_step']:.2f} ms vs floor {b1['floor_ms']:.2f} ms ({b1['ratio_to_floor']:.2f}x)"))
    else:
        out.append(("7B batch-1 decode <= 1.25x bandwidth floor", None, "not measured"))
    ours, theirs = m.get("throughput", {}), m.get("hf_throughput", {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        out.append(("7B throughput >= 3x transformers static-cache generate() b32", ratio >= THROUGHPUT_RATIO,
                    f"{ours['tokens_per_s']:.0f} vs {theirs['tokens_per_s']:.0f} tok/s ({ratio:.2f}x)"))
    else:
        out.append(("7B throughput >= 3x transformers static-cache generate() b32", None, "not measured"))
    for name, s in report["shapes"].items():
        lg = s.get("logits", {})
        if "pass" in lg:
            out.append((f"{name} logits match transformers", lg["pass"],
                        f"top-1 {lg['top1_agreement']:.4f}, max |dlogp| {lg['max_abs_logprob_diff']:.4f}"))
        else:
            out.append((f"{name} logits match transformers", None, "not measured"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, float32 on CPU, small sizes")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    ap.add_argument("--weights", choices=("memory", "disk"), default=None,
                    help="load random weights from memory (GPU default) or via a written HF checkpoint (dry-run "
                         "default)")
    ap.add_argument("--hf-shapes", default="llama2-7b", help="shapes that also get the transformers phases")
    ap.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 450; dry-run 120)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = dict(DRY if args.dry_run else FULL)
    if args.budget_s:
        cfg["budget_s"] = args.budget_s
    args.weights = args.weights or ("disk" if args.dry_run else "memory")
    if args.dry_run:
        device, dtype, shapes = torch.device("cpu"), torch.float32, DRY_SHAPES
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device (use --dry-run on CPU)")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SHAPES
    names = [s for s in args.shapes.split(",") if s]
    budget = Budget(cfg["budget_s"])
    report = {"config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                         "dry_run": args.dry_run, "weights": args.weights, "device": str(device),
                         "dtype": str(dtype), "torch": torch.__version__,
                         **({"note": "dry run: tiny shapes on CPU; the figures mean nothing"} if args.dry_run else {})},
              "shapes": {}}
    if device.type == "cuda":
        report["config"]["gpu"] = torch.cuda.get_device_name(device)
    root = Path(tempfile.mkdtemp(prefix="llamagrid-gpu-"))
    try:
        bw = run_phase(report, "bandwidth", lambda: phase_bandwidth(cfg, device), budget)
        bandwidth = bw["bytes_per_s"] if bw else None
        for name in names:
            shape = shapes[name]
            print(f"{name}: {shape}", flush=True)
            s = report["shapes"][name] = {"shape": shape}
            share = 1 / max(1, len(names) - names.index(name))  # this shape's share of the time left
            shape_budget = Budget(budget.left * (0.65 if len(names) > 1 and share < 1 else 1.0))
            run_shape(name, shape, s, args, cfg, device, dtype, root, bandwidth, shape_budget)
            free_memory(device)
            with contextlib.suppress(OSError):
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        report["total_s"] = round(budget.seconds - budget.left, 1)
        report["checks"] = [{"name": n, "pass": ok, "detail": d} for n, ok, d in checks(report)]
        args.out.write_text(json.dumps(report, indent=2, default=str))
    print()
    for n, ok, d in checks(report):
        print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}: {n}: {d}")
    for line in attention_choice(report):
        print(line)
    print(f"report: {args.out} ({report['total_s']} s)")
    return 0


def attention_choice(report: dict) -> list[str]:
    """Decode ms per step with FlexAttention in place vs the gather path, eager, same batch: < 1 means flex wins."""
    out = []
    for name, s in report["shapes"].items():
        rows = s.get("decode", {}).get("batches", {})
        for key, r in rows.items():
            gather = rows.get(key.replace("_flex", "_eager"), {})
            if key.endswith("_flex") and "ms_per_step" in r and "ms_per_step" in gather:
                out.append(f"decode attention, {name} batch {r['batch']}: flex {r['ms_per_step']:.2f} ms vs gather "
                           f"{gather['ms_per_step']:.2f} ms per step ({r['ms_per_step'] / gather['ms_per_step']:.2f}x)")
    return out


if __name__ == "__main__":
    sys.exit(main())
