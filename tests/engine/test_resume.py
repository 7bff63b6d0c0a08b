"""Resumed requests (failover): prompt + tokens already streamed continue exactly as the uninterrupted run."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import pytest

from tests.engine_utils import make_worker
from worker.chat_template import ChatMessage
from worker.engine import EngineRequest, ErrorEvent, FinishEvent, TokenEvent
from worker.sequence import FinishReason, SamplingParams


@dataclass
class Run:
    """Every event of one request, in order."""

    events: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, events) -> None:
        self.events.extend(events)
        if any(isinstance(e, FinishEvent | ErrorEvent) for e in events):
            self.done.set()

    @property
    def deltas(self) -> list[TokenEvent]:
        return [e for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.deltas for t in e.token_ids]

    @property
    def finish(self) -> FinishEvent:
        last = self.events[-1]
        assert isinstance(last, FinishEvent), last
        return last

    def text_through(self, num_tokens: int) -> str:
        """What a client had received once the event carrying the num_tokens-th token id arrived."""
        text, seen = [], 0
        for e in self.deltas:
            if seen >= num_tokens:
                break
            text.append(e.text)
            seen += len(e.token_ids)
        return "".join(text)


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = make_worker(tiny_model_dir, kv_cache_tokens=16384, block_size=16, max_num_batched_tokens=2048,
                    max_num_seqs=64)
    yield w
    w.engine.stop()


def start(worker, request_id: str, prompt: list[int], params: SamplingParams, *, chat: bool = False,
          resume: list[int] = ()) -> Run:
    run = Run()
    worker.engine.submit(EngineRequest(request_id, prompt, params, run.sink, is_chat_reply=chat,
                                       resume_token_ids=list(resume)))
    return run


def wait(runs: list[Run]) -> None:
    for r in runs:
        assert r.done.wait(300), "request did not finish"
        assert not isinstance(r.events[-1], ErrorEvent), r.events[-1]


def check_every_cut(worker, name: str, prompt: list[int], params: SamplingParams, chat: bool = False) -> Run:
    """Run uninterrupted, then resume after every k tokens at once; each resumed run continues it exactly."""
    full = start(worker, f"{name}-full", prompt, params, chat=chat)
    wait([full])
    ids = full.token_ids
    assert ids, "the uninterrupted run generated nothing"
    resumed = {k: start(worker, f"{name}-k{k}", prompt, params, chat=chat, resume=ids[:k])
               for k in range(1, len(ids) + 1)}
    wait(list(resumed.values()))
    for k, run in resumed.items():
        where = f"{name} resumed after {k} of {len(ids)} tokens"
        assert full.text_through(k) + run.text == full.text, where
        assert ids[:k] + run.token_ids == ids, where
        assert run.finish.finish_reason == full.finish.finish_reason, where
        assert run.finish.num_output_tokens == full.finish.num_output_tokens, where
        assert run.finish.output_token_ids == full.finish.output_token_ids, where
        assert run.finish.prompt_token_ids == prompt, where
        assert run.finish.num_prompt_tokens == len(prompt), where
        for delta in run.deltas:
            assert delta.text or delta.token_ids, where
    return full


GREEDY = SamplingParams(max_new_tokens=24)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=7, repetition_penalty=1.3,
                         ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_text_prompt_resumes_exactly(worker, params):
    prompt = worker.tokenizer.encode_prompt("Once upon a time there was")
    check_every_cut(worker, f"text-{params.seed}", prompt, params)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_chat_reply_resumes_exactly(worker, params):
    """The chat reply's dropped leading space stays dropped only at the very start of the reply."""
    prompt = worker.tokenizer.encode_dialog([ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there")])
    full = check_every_cut(worker, f"chat-{params.seed}", prompt, params, chat=True)
    assert not full.text.startswith(" ")


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_stop_strings_across_the_resume_point(worker, params):
    """Stop strings built from the unconstrained output, so they complete mid-run (some across two tokens):
    cuts before, inside and after the stop string all end the same way."""
    prompt = worker.tokenizer.encode_prompt("The weather today")
    free = start(worker, f"stop-free-{params.seed}", prompt, replace(params, ignore_eos=True))
    wait([free])
    text = free.text
    assert len(text) > 20
    stops = [(text[12:15],), (text[8:10], "\u2603never")]
    for i, stop in enumerate(stops):
        constrained = replace(params, stop=stop, ignore_eos=True)
        full = check_every_cut(worker, f"stop{i}-{params.seed}", prompt, constrained)
        assert full.finish.finish_reason == FinishReason.STOP
        assert stop[0] not in full.text


def test_multibyte_characters_split_by_the_resume_point(worker):
    """Byte-fallback output: a cut between the bytes of one character still yields whole characters."""
    prompt = worker.tokenizer.hf("Ελληνικά 中文 🙂 café", add_special_tokens=True)["input_ids"]
    pieces = worker.tokenizer.decoder.pieces
    num_split_cuts = 0
    for seed in range(4):
        params = SamplingParams(max_new_tokens=40, temperature=1.2, seed=seed, ignore_eos=True)
        full = check_every_cut(worker, f"mb{seed}", prompt, params)
        # cuts right after a token whose bytes did not complete a character
        num_split_cuts += sum(1 for e in full.deltas if e.token_ids and not e.text and pieces[e.token_ids[0]])
    assert num_split_cuts > 0, "the tiny model produced no multi-byte character to cut through"


def test_resume_that_already_ends_finishes_at_once(worker):
    prompt = worker.tokenizer.encode_prompt("Hello")
    full = start(worker, "end-full", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    wait([full])
    ids = full.token_ids
    eos = min(worker.tokenizer.eos_token_ids)
    length = start(worker, "end-length", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), resume=ids)
    at_eos = start(worker, "end-eos", prompt, SamplingParams(max_new_tokens=6), resume=[*ids[:2], eos])
    past_eos = start(worker, "end-ignore-eos", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True),
                     resume=[*ids[:2], eos])
    wait([length, at_eos, past_eos])
    assert length.token_ids == [] and length.finish.finish_reason == FinishReason.LENGTH
    assert length.finish.num_output_tokens == 6 and length.finish.output_token_ids == ids
    assert at_eos.token_ids == [] and at_eos.finish.finish_reason == FinishReason.EOS
    assert at_eos.finish.num_output_tokens == 3
    assert len(past_eos.token_ids) == 3 and past_eos.finish.finish_reason == FinishReason.LENGTH


def test_resumed_prompt_and_output_hit_the_prefix_cache(worker):
    prompt = worker.tokenizer.encode_prompt(" ".join(["A long prompt that fills several blocks."] * 6))
    assert len(prompt) > 48
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    full = start(worker, "cache-full", prompt, params)
    wait([full])
    resumed = start(worker, "cache-resumed", prompt, params, resume=full.token_ids[:30])
    wait([resumed])
    assert resumed.token_ids == full.token_ids[30:]
    assert resumed.finish.num_cached_tokens == len(prompt)  # its blocks, and the resumed tokens' too
