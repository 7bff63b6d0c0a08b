"""Drive an in-process engine synchronously from tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from worker.app import Worker
from worker.config import WorkerConfig
from worker.engine import EngineRequest, ErrorEvent, FinishEvent, TokenEvent
from worker.sequence import FinishReason, SamplingParams


@dataclass
class Result:
    deltas: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprobs, when the request asked
    finish: FinishEvent | None = None
    error: ErrorEvent | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.finish.finish_reason if self.finish else None

    def sink(self, events) -> None:
        for e in events:
            if isinstance(e, TokenEvent):
                self.deltas.append(e.text)
                self.token_ids.extend(e.token_ids)
                self.logprobs.extend(e.logprobs)
            elif isinstance(e, FinishEvent):
                self.finish = e
                self.done.set()
            elif isinstance(e, ErrorEvent):
                self.error = e
                self.done.set()


def make_worker(model_dir: Path, **overrides) -> Worker:
    """A loaded worker with its engine thread running (no gRPC server)."""
    config = WorkerConfig(model_dir=model_dir, **{"kv_cache_tokens": 8192, "num_threads": 2, **overrides})
    worker = Worker(config)
    worker.engine.start()
    return worker


def submit(worker: Worker, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Result:
    result = Result()
    worker.engine.submit(EngineRequest(request_id, prompt_ids, params, result.sink))
    return result


def run_all(worker: Worker, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            timeout: float = 300.0, prefix: str = "r") -> list[Result]:
    """Submit every prompt at once (so they batch) and wait for all to finish."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    results = [submit(worker, f"{prefix}{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))]
    for r in results:
        assert r.done.wait(timeout), "request did not finish"
        assert r.error is None, r.error
    return results
