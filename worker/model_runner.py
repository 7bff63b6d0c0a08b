"""Turns a scheduled batch into a step plan, runs the model on the paged KV cache, and samples (rank 0).

With tensor parallelism, rank 0's runner broadcasts each step plan before running its shard, and the runners
of ranks 1..N-1 (worker.tp.rank_main) receive the same plan and run theirs; logits reach rank 0 only.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

import torch

from worker.grammar import allocate_bitmask, fill_all
from worker.heartbeat import Heartbeat
from worker.model.context import AttentionContext
from worker.model.dims import ModelDims
from worker.model.flex_decode import FlexDecode
from worker.model.parallel import TPInfo
from worker.sampler import sample, token_logprobs
from worker.scheduler import ScheduledBatch
from worker.tp.plan import PlanChannel, PlanKind, StepPlan

TICK_S = 0.2  # the idle ticker's period
IDLE_PLAN_INTERVAL_S = 0.25  # rank 0 sends an IDLE plan when it has sent nothing for this long


class ModelRunner:
    """Owns the model shard and its KV cache shard; run() is called only from the engine thread."""

    def __init__(self, model, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 tp: TPInfo | None = None, plans: PlanChannel | None = None,
                 on_group_failure: Callable[[str, BaseException], None] | None = None,
                 heartbeat: Heartbeat | None = None, cuda_graphs: bool = False, max_num_seqs: int = 256,
                 max_context: int = 4096, decode_attention: str = "gather"):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.tp = tp or TPInfo()
        self.plans = plans if self.tp.size > 1 else None  # None: a single rank, no broadcasts at all
        self.on_group_failure = on_group_failure
        self.heartbeat = heartbeat
        dims = ModelDims.from_config(model.config, self.tp.size)
        shape = dims.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(dims.num_layers)
        ]
        self._lock = threading.Lock()  # one plan and its collectives at a time (engine thread vs ticker)
        self._last_plan_at = time.monotonic()
        self._ticker: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        self._progress: Callable[[], object] | None = None
        self._last_progress: object = None
        self.logprobs: dict = {}  # request id -> TokenLogprobs of the last step, for the requests that asked
        # one thread filling grammar masks during the model's step (worker.grammar.fill_all: one call, without the GIL)
        self._masks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        if decode_attention == "flex":  # every rank the same: each runs the same attention on its heads
            model.model.flex_decode = FlexDecode(num_blocks, block_size, max_num_seqs, device)
        self.graphs = None  # decode steps as CUDA graphs: one GPU rank only (worker.cuda_graphs)
        if cuda_graphs and device.type == "cuda" and self.tp.size == 1:
            from worker.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, block_size=block_size, device=device,
                                       max_num_seqs=max_num_seqs, max_context=max_context)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv_caches)

    # --- rank 0 ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[str, int]:
        """Compute every scheduled chunk; return the sampled next token of each sampling sequence."""
        if self.heartbeat is not None:
            self.heartbeat.beat()
        plan = self._plan(batch)
        sampling = [e.seq for e in batch.entries if e.is_sampling]
        constrained = [i for i, s in enumerate(sampling) if s.constraint is not None]
        filling = None
        if constrained:  # the grammars' masks are computed while the model runs (they depend on past tokens only)
            bitmask = allocate_bitmask(len(constrained), self.model.config.vocab_size)
            filling = self._masks.submit(fill_all, [sampling[i].constraint for i in constrained], bitmask)
        logits = self.execute(plan) if self.plans is None else self._execute_in_group(plan)
        self.logprobs = {}
        if not sampling:
            return {}
        token_ids = sample(
            logits,
            [s.params for s in sampling],
            [s.token_ids for s in sampling],
            [s.num_output_tokens for s in sampling],
            [s.eos_token_ids for s in sampling],
            (constrained, filling.result()) if filling is not None else None,
        )
        for i in constrained:
            sampling[i].constraint.accept(token_ids[i])
        wanted = [i for i, s in enumerate(sampling) if s.params.logprobs is not None]
        if wanted:  # (read by the engine after the step, for the requests that asked)
            rows = logits[torch.tensor(wanted, device=logits.device)]
            found = token_logprobs(rows, [token_ids[i] for i in wanted], [sampling[i].params.logprobs for i in wanted])
            self.logprobs = {sampling[i].request_id: lp for i, lp in zip(wanted, found, strict=True)}
        return {s.request_id: t for s, t in zip(sampling, token_ids, strict=True)}

    def _execute_in_group(self, plan: StepPlan) -> torch.Tensor | None:
        with self._lock:
            try:
                self.plans.send(plan)
                self._last_plan_at = time.monotonic()
                return self.execute(plan)
            except Exception as e:  # noqa: BLE001 - the other ranks are mid-step: the group cannot go on
                self._group_failed("model step failed on rank 0", e)
                raise

    def start_ticker(self, progress: Callable[[], object]) -> None:
        """Keep the group and the heartbeat alive while the engine has nothing to run.

        Every TICK_S a thread sends an IDLE plan (tensor parallel only) when no plan went out for
        IDLE_PLAN_INTERVAL_S, so the other ranks leave their collective and heartbeat. Rank 0's heartbeat is
        beaten there only if progress() returned a new object since the last tick: progress is the engine
        loop's proof of life (Engine.load is rebuilt on every turn of the loop), so a hung engine goes stale.
        """
        if self._ticker is not None or (self.plans is None and self.heartbeat is None):
            return
        self._progress = progress
        self._ticker = threading.Thread(target=self._tick, name="runner-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._ticker_stop.wait(TICK_S):
            self.idle()

    def idle(self) -> None:
        """Send an IDLE plan if one is due and beat if the engine moved; skipped while a step runs."""
        if not self._lock.acquire(blocking=False):
            return  # run() holds it: the step itself beats and reaches the other ranks
        try:
            if self.plans is not None and time.monotonic() - self._last_plan_at >= IDLE_PLAN_INTERVAL_S:
                self.plans.send_control(PlanKind.IDLE)
                self._last_plan_at = time.monotonic()
            if self.heartbeat is not None and self._progress is not None:
                now = self._progress()
                if now is not self._last_progress:
                    self._last_progress = now
                    self.heartbeat.beat()
        except Exception as e:  # noqa: BLE001 - a failed broadcast means a rank is gone
            self._group_failed("idle plan failed", e)
        finally:
            self._lock.release()

    def shutdown(self) -> None:
        """Stop the ticker and tell the other ranks to exit (rank 0, once the engine has stopped)."""
        self._ticker_stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.plans is not None:
            with self._lock:
                self.plans.send_control(PlanKind.STOP)
            self.plans = None

    def _group_failed(self, reason: str, error: BaseException) -> None:
        if self.on_group_failure is not None:
            self.on_group_failure(reason, error)

    # --- every rank ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the model on the plan; logits [R, vocab] of its sample rows on rank 0 (None elsewhere).
        Ranks > 0 call it for each STEP plan they receive (worker.tp.rank_main)."""
        if self.graphs is not None:
            logits = self.graphs.run(plan)  # None: not a decode step a graph can take
            if logits is not None:
                return logits
        input_ids, positions, ctx, sample_rows = self._tensors(plan)
        hidden = self.model(input_ids, positions, ctx, self.kv_caches)
        if not plan.num_sample_rows:
            return None
        logits = self.model.compute_logits(hidden[sample_rows])
        return None if logits is None else logits.float()

    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = 0
        for e in batch.entries:
            seq, start, n = e.seq, e.start, e.num_new_tokens
            end = start + n
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            if e.is_sampling:
                sample_rows.append(len(input_ids) - 1)
            max_blocks = max(max_blocks, (end + bs - 1) // bs)
        block_tables = torch.zeros((len(batch.entries), max_blocks), dtype=torch.long)
        for i, e in enumerate(batch.entries):
            needed = (context_lens[i] + bs - 1) // bs
            block_tables[i, :needed] = torch.tensor(e.seq.block_table[:needed], dtype=torch.long)
        return StepPlan(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
        )

    def _tensors(self, plan: StepPlan):
        cu = [0]
        for q in plan.query_lens:
            cu.append(cu[-1] + q)
        dev = self.device
        ctx = AttentionContext(
            query_lens=plan.query_lens,
            context_lens=plan.context_lens,
            cu_query_lens=torch.tensor(cu, dtype=torch.long, device=dev),
            context_lens_t=torch.tensor(plan.context_lens, dtype=torch.long, device=dev),
            slot_mapping=plan.slot_mapping.to(dev),
            block_tables=plan.block_tables.to(dev),
            block_size=self.block_size,
        )
        return plan.input_ids.to(dev), plan.positions.to(dev), ctx, plan.sample_rows.to(dev)
