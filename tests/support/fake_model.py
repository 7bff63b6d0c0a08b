"""What a fake worker computes, without a model: its script (size, pacing, faults), token ids of prompts (word by
word), replies as a deterministic chain of ids seeded by the prompt (each token depends on the prompt and every token
before it, so a resumed job continues exactly and a wrong resume shows), and the worker's checks of a job."""

from __future__ import annotations

import json
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc

from common.request_ids import MAX_JOB_ID_CHARS
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from worker import chat_template

BOS, EOS, FIRST_ID = 1, 2, 3


# ---- the script


@dataclass
class Fault:
    """What goes wrong with a job. `kind`: "fail" ends the call with status `code` once `after_tokens` new tokens
    were sent (0: refused before any event); "hang" stops sending there and answers nothing more (not even a Cancel)
    until the call is cancelled; "die" stops the whole server there (in a process: exits with `exit_code`), as a
    replica that dies mid-stream. Applies to the next `times` jobs (None: every job) whose request id contains
    `match`."""

    kind: str = "fail"
    after_tokens: int = 0
    code: str = "UNAVAILABLE"
    times: int | None = None
    match: str = ""
    exit_code: int = 1


@dataclass
class Script:
    model: str = "fake-llama"
    max_context: int = 4096  # Llama-2's
    default_max_new_tokens: int = 64
    kv_capacity_tokens: int = 8192
    block_size: int = 16
    max_num_seqs: int = 64
    vocab_size: int = 32000
    token_delay_s: float = 0.002  # between two tokens of a job
    accept_delay_s: float = 0.0  # a job waits this long (counted as waiting in Load) before it runs
    eos_after: int | None = None  # the n-th reply token is the end-of-sequence id (unless ignore_eos)
    faults: list[Fault] = field(default_factory=list)
    serving: bool = True  # health at start (NOT_SERVING: a replica that never finishes starting)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Script:
        data = json.loads(text)
        data["faults"] = [Fault(**f) for f in data.get("faults", [])]
        return cls(**data)


# ---- ids, texts and replies


def word_id(word: str, vocab_size: int) -> int:
    return FIRST_ID + zlib.crc32(word.encode()) % (vocab_size - FIRST_ID)


def token_text(token: int) -> str:
    return "" if token == EOS else f" t{token}"


def encode_text(text: str, vocab_size: int = Script.vocab_size) -> list[int]:
    """A text prompt: the beginning-of-sequence id, then one id per whitespace-separated word."""
    return [BOS, *(word_id(w, vocab_size) for w in text.split())]


def encode_chat(messages: Sequence, vocab_size: int = Script.vocab_size, history: Sequence[int] = ()) -> list[int]:
    """A conversation (after a session's history, when given): per message a role id, its words, an end id."""
    ids = list(history) if history else [BOS]
    for m in messages:
        ids += [word_id(f"<{m.role}>", vocab_size), *(word_id(w, vocab_size) for w in m.content.split()),
                word_id("</m>", vocab_size)]
    return ids


def mix(state: int, token: int) -> int:
    return zlib.crc32(token.to_bytes(4, "little"), state)


def seed_state(prompt_ids: Sequence[int], params: pb.SamplingParameters) -> int:
    state = zlib.crc32(array("I", prompt_ids).tobytes())
    if params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0.0):
        state = zlib.crc32(str(params.seed).encode(), state)
    return state


def reply(prompt_ids: Sequence[int], params: pb.SamplingParameters, num_tokens: int, script: Script | None = None,
          ) -> list[int]:
    """The first `num_tokens` tokens an uninterrupted job on `prompt_ids` generates (what a test expects)."""
    script = script or Script()
    state, out = seed_state(prompt_ids, params), []
    for _ in range(num_tokens):
        token = next_token(state, len(out), params, script)
        out.append(token)
        state = mix(state, token)
    return out


def next_token(state: int, position: int, params: pb.SamplingParameters, script: Script) -> int:
    if script.eos_after is not None and position + 1 == script.eos_after:
        return EOS
    return FIRST_ID + state % (script.vocab_size - FIRST_ID)


# ---- the record of what a job was and did


@dataclass
class JobRecord:
    request_id: str
    method: str  # "Run" or "Generate"
    job: wpb.Job
    metadata: dict[str, str]
    time_remaining_s: float | None  # the call's own deadline, as the worker saw it on arrival
    received_at: float = field(default_factory=time.monotonic)
    prompt_ids: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting, running, ended
    outcome: str = ""  # finished, cancelled (a Cancel message), deadline (the job's own), call_cancelled, failed,
    #                    refused (INVALID_ARGUMENT and the like), died
    sent_token_ids: list[int] = field(default_factory=list)  # new tokens this call streamed, the last one included
    num_generated: int = 0  # resumed tokens included
    finish_reason: int = 0
    cancel_received: bool = False
    ended_at: float | None = None

    @property
    def tenant(self) -> str:
        return self.job.tenant

    @property
    def tenant_weight(self) -> int:
        return self.job.tenant_weight

    @property
    def resume_token_ids(self) -> list[int]:
        return list(self.job.resume_token_ids)

    @property
    def history_token_ids(self) -> list[int]:
        return list(self.job.history_token_ids)

    @property
    def parameters(self) -> pb.SamplingParameters:
        return self.job.parameters

    @property
    def deadline_unix_ms(self) -> int:
        return self.job.deadline_unix_ms

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def summary(self) -> dict:
        return {"request_id": self.request_id, "method": self.method, "state": self.state, "outcome": self.outcome,
                "tenant": self.tenant, "tenant_weight": self.tenant_weight,
                "resume_token_ids": self.resume_token_ids, "num_history_token_ids": len(self.job.history_token_ids),
                "num_sent": len(self.sent_token_ids), "finish_reason": self.finish_reason,
                "deadline_unix_ms": self.deadline_unix_ms, "cancel_received": self.cancel_received}


# ---- the worker's checks of a job


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(field_: str, problem: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field_}: {problem}")


def _check_parameters(p: pb.SamplingParameters, script: Script, prefix: str) -> None:
    """The worker's checks of the parameters the router passes through (same fields, same messages)."""
    if p.HasField("max_new_tokens") and p.max_new_tokens == 0:
        raise invalid(f"{prefix}.max_new_tokens", "must be at least 1")
    if p.HasField("max_new_tokens") and p.max_new_tokens > script.max_context:
        raise invalid(f"{prefix}.max_new_tokens",
                       f"{p.max_new_tokens} is above the model's context of {script.max_context} tokens")
    if p.HasField("temperature") and not p.temperature >= 0:
        raise invalid(f"{prefix}.temperature", "must be >= 0 (0 means greedy)")
    if p.HasField("top_p") and not 0.0 < p.top_p <= 1.0:
        raise invalid(f"{prefix}.top_p", "must be in (0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        if p.HasField(name) and not -2.0 <= getattr(p, name) <= 2.0:
            raise invalid(f"{prefix}.{name}", f"must be in [-2, 2] (0 disables it), got {getattr(p, name):g}")
    for i, s in enumerate(p.stop):
        if not s:
            raise invalid(f"{prefix}.stop[{i}]", "must not be empty")




def check_model(model: str, script: Script) -> None:
    if model and model != script.model:
        raise Refused(grpc.StatusCode.NOT_FOUND,
                      f"model {model!r} is not served here; this worker serves {script.model!r}")


def chat_prompt(messages, history: Sequence[int], field_: str, script: Script) -> list[int]:
    msgs = [chat_template.ChatMessage(m.role, m.content) for m in messages]
    try:
        chat_template.validate_messages(msgs, max_message_chars=100_000, is_continuation=bool(history))
    except chat_template.ChatTemplateError as e:
        raise invalid(f"{field_.removesuffix('.messages')}.{e.field}", e.message) from None
    return encode_chat(messages, script.vocab_size, history)


def job_prompt(job: wpb.Job, script: Script) -> list[int]:
    """The prompt ids of a job after the worker's checks of it (Refused: the status and message it answers)."""
    s = script
    check_model(job.model, s)
    if not job.request_id or len(job.request_id) > MAX_JOB_ID_CHARS:
        raise invalid("job.request_id", f"must be 1..{MAX_JOB_ID_CHARS} characters")
    which = job.WhichOneof("prompt")
    if which == "text":
        if not job.text:
            raise invalid("job.text", "must not be empty")
        ids, field_ = encode_text(job.text, s.vocab_size), "job.text"
    elif which == "chat":
        ids, field_ = chat_prompt(job.chat.messages, job.history_token_ids, "job.chat.messages", s), "job.chat"
    elif which == "token_ids":
        ids, field_ = list(job.token_ids.ids), "job.token_ids"
    else:
        raise invalid("job.prompt", "set text, chat or token_ids")
    if len(ids) >= s.max_context:
        raise invalid(field_, f"prompt has {len(ids)} tokens; the model's context is {s.max_context} tokens "
                              "and at least one must be left to generate")
    _check_parameters(job.parameters, s, "job.parameters")
    for i, t in enumerate(job.resume_token_ids):
        if t >= s.vocab_size:
            raise invalid(f"job.resume_token_ids[{i}]", f"token id {t} is outside the vocabulary of {s.vocab_size}")
    return ids
