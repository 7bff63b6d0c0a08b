"""OpenAI's chat completions, completions and models, translated to and from the router's own requests.

Request bodies are pydantic models (validated and documented in the OpenAPI schema); what llamagrid does with each
field is README's "OpenAI-compatible HTTP" table: honoured, ignored, or refused with a 400 naming the field. Responses
are written as JSON text directly (one string per streamed event, no model objects on the hot path)."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequest
from protos.llamagrid.v1 import inference_pb2 as pb
from router.http.exchange import MAX_UINT32, Exchange, Renames, sampling
from router.servicer import billed

MAX_TOP_LOGPROBS = 20
MAX_N = 16
FINISH = {pb.LENGTH: "length", pb.STOP: "stop", pb.EOS: "stop", pb.CANCELLED: "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields this server does not know are ignored, as OpenAI's SDKs add them


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class _Common(_Open):
    model: str = Field("", description="A model listed by GET /v1/models; empty: the router's default model.")
    max_tokens: int | None = Field(None, description="Most tokens to generate (the model's default if unset).")
    temperature: float | None = Field(None, description="0 to 2; 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus mass, in (0, 1].")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings; the text ends before the first.")
    seed: int | None = Field(None, description="Reproducible sampling.")
    n: int | None = Field(None, description="1 to 16 completions (choices) per prompt, the prompt prefilled once.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored (never logged).")
    presence_penalty: float | None = Field(None, description="-2 to 2: subtracted once from every token the "
                                           "completion already contains.")
    frequency_penalty: float | None = Field(None, description="-2 to 2: subtracted per occurrence in the completion.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    # llamagrid's own sampling controls (vLLM takes the same names as extra fields)
    top_k: int | None = Field(None, description="llamagrid: keep the k most likely tokens; 0 disables.")
    repetition_penalty: float | None = Field(None, description="llamagrid: > 0; 1 disables.")
    ignore_eos: bool | None = Field(None, description="llamagrid: keep generating past end-of-sequence.")
    min_tokens: int | None = Field(None, description="llamagrid (vLLM's name): no end-of-sequence before this many "
                                   "tokens.")


class ChatCompletionRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, description="Same as max_tokens (which it overrides).")
    logprobs: bool | None = Field(None, description="Each token's logprob in choices[].logprobs.content.")
    top_logprobs: int | None = Field(None, description="0 to 20 most likely tokens per position (with logprobs).")
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or '
                                                   '{"type": "json_schema", "json_schema": {"schema": {...}}}.')
    tools: list[Any] | None = Field(None, description="Only empty.")
    tool_choice: Any = Field(None, description='Only "none".')
    functions: list[Any] | None = Field(None, description="Only empty.")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = Field(None, description="Only false.")
    best_of: int | None = Field(None, description="Only 1.")
    suffix: str | None = Field(None, description="Only unset.")
    logprobs: int | None = Field(None, description="0 to 20: each token's logprob and this many most likely.")


# ---- requests


def _refuse_unsupported(body: _Common) -> None:
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise InvalidRequest("n", f"must be between 1 and {MAX_N}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2 <= value <= 2:
            raise InvalidRequest(name, f"must be between -2 and 2, got {value:g}")
    if body.min_tokens is not None and not 0 <= body.min_tokens <= MAX_UINT32:
        raise InvalidRequest("min_tokens", "must be a non-negative integer")
    if body.logit_bias:
        raise InvalidRequest("logit_bias", "is not supported")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise InvalidRequest("temperature", f"must be between 0 and 2, got {body.temperature:g}")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {body.top_p:g}")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value is not None and not 1 <= value <= MAX_UINT32:
            raise InvalidRequest(name, f"must be between 1 and {MAX_UINT32}")
    if body.top_k is not None and not 0 <= body.top_k <= MAX_UINT32:
        raise InvalidRequest("top_k", "must be a non-negative integer (0 disables)")


def _parameters(body: _Common, max_tokens: int | None) -> pb.SamplingParameters:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    params = sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    seed=body.seed, stop=stop, repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    min_new_tokens=body.min_tokens)
    if body.n is not None and body.n > 1:
        params.n = body.n
    return params


def _include_usage(body: _Common) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


def _messages(messages: list[Message]) -> list[pb.ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise InvalidRequest(f"messages[{i}].role", f"{m.role!r} is not supported (system, developer, user, "
                                                        "assistant)")
        if m.tool_calls:
            raise InvalidRequest(f"messages[{i}].tool_calls", "tool calls are not supported")
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(f"messages[{i}].content[{j}].type", f"only text parts are supported, got "
                                                                             f"{part.type!r}")
                parts.append(part.text)
            content = "".join(parts)
        out.append(pb.ChatMessage(role=role, content=content or ""))
    return out


# The router's field names in its errors, as this API's client named them (first match wins).
_PARAMETER_RENAMES: Renames = (
    ("parameters.max_new_tokens", "max_tokens"), ("parameters.temperature", "temperature"),
    ("parameters.top_p", "top_p"), ("parameters.top_k", "top_k"), ("parameters.seed", "seed"),
    ("parameters.stop", "stop"), ("parameters.repetition_penalty", "repetition_penalty"),
    ("parameters.presence_penalty", "presence_penalty"), ("parameters.frequency_penalty", "frequency_penalty"),
    ("parameters.min_new_tokens", "min_tokens"), ("parameters", "body"))


def chat_exchange(body: ChatCompletionRequest) -> Exchange:
    _refuse_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
    if body.tools or body.functions:
        raise InvalidRequest("tools" if body.tools else "functions", "tools are not supported")
    if body.tool_choice not in (None, "none"):
        raise InvalidRequest("tool_choice", 'only "none" is supported')
    if not body.messages:
        raise InvalidRequest("messages", "at least one message is required")
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = pb.GenerateRequest(model=body.model, parameters=_parameters(body, max_tokens),
                                 conversations=[pb.Conversation(messages=_messages(body.messages))])
    if body.logprobs:
        request.parameters.logprobs = body.top_logprobs or 0
    _response_format(body.response_format, request.parameters)
    renames = (("conversations[0].messages", "messages"), ("conversations", "messages"),
               ("parameters.max_new_tokens", max_field), ("parameters.logprobs", "top_logprobs"),
               ("parameters.json_schema", "response_format.json_schema.schema"),
               ("parameters.json_object", "response_format"), ("parameters.ignore_eos", "ignore_eos"),
               *_PARAMETER_RENAMES)
    return ChatStream(request, renames, bool(body.stream), _include_usage(body))


def _response_format(response_format: dict[str, Any] | None, params: pb.SamplingParameters) -> None:
    """OpenAI's response_format as a constraint: {"type": "json_schema", "json_schema": {"schema": {...}}} or
    {"type": "json_object"}; "text" (or none) leaves the output free. `strict` is accepted: the schema is always
    enforced."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        params.json_object = True
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema", "must be a JSON Schema object")
        params.json_schema = json.dumps(schema)
    elif kind != "text":
        raise InvalidRequest("response_format.type", f"{kind!r} is not supported (text, json_object, json_schema)")


def completion_exchange(body: CompletionRequest) -> Exchange:
    _refuse_unsupported(body)
    if body.echo:
        raise InvalidRequest("echo", "is not supported")
    if body.best_of not in (None, 1):
        raise InvalidRequest("best_of", "only 1 is supported")
    if body.suffix:
        raise InvalidRequest("suffix", "is not supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
    prompt = body.prompt
    if isinstance(prompt, str):
        inputs, renames = [prompt], (("inputs[0]", "prompt"), ("inputs", "prompt"))
    elif prompt and all(isinstance(p, str) for p in prompt):
        inputs, renames = list(prompt), (("inputs", "prompt"),)
    elif not prompt:
        raise InvalidRequest("prompt", "at least one prompt is required")
    else:
        raise InvalidRequest("prompt", "token-id prompts are not supported; send text")
    request = pb.GenerateRequest(model=body.model, inputs=inputs, parameters=_parameters(body, body.max_tokens))
    if body.logprobs is not None:
        request.parameters.logprobs = body.logprobs
    return CompletionStream(request, (*renames, ("parameters.logprobs", "logprobs"), *_PARAMETER_RENAMES),
                            bool(body.stream), _include_usage(body))


# ---- responses


def usage_json(usage: pb.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def _sum_usage(usages, n: int = 1) -> pb.Usage:
    """The usage of a reply: every completion's, a prompt's tokens once for its n completions (router.servicer)."""
    total = pb.Usage()
    for index, u in enumerate(usages):
        u = billed(u, index, n)
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.cached_prompt_tokens += u.cached_prompt_tokens
    return total


class _OpenAIStream(Exchange):
    """Server-sent events: one `data: {...}` per chunk, a usage chunk when asked for, then `data: [DONE]`."""

    media_type = "text/event-stream"
    kind = ""
    id_prefix = ""

    def __init__(self, request: pb.GenerateRequest, renames: Renames, stream: bool, include_usage: bool) -> None:
        super().__init__(request, renames, stream)
        self.include_usage = include_usage
        self.n = request.parameters.n or 1
        self.created = int(time.time())
        self.usages: dict[int, pb.Usage] = {}  # choice index -> its usage, as each choice finishes
        self._head = ""

    def begin(self, request_id: str, model: str) -> None:
        super().begin(request_id, model)
        self.id = f"{self.id_prefix}{request_id}"
        usage = ',"usage":null' if self.include_usage else ""
        self._head = (f'data: {{"id":{_DUMPS(self.id)},"object":"{self.kind}","created":{self.created},'
                      f'"model":{_DUMPS(model)}{usage},"choices":[')

    def end(self) -> bytes:
        tail = ""
        if self.include_usage:
            usage = _DUMPS(usage_json(_sum_usage([self.usages[i] for i in sorted(self.usages)], self.n)))
            tail = (f'data: {{"id":{_DUMPS(self.id)},"object":"{self.kind}","created":{self.created},'
                    f'"model":{_DUMPS(self.model)},"choices":[],"usage":{usage}}}\n\n')
        return (tail + "data: [DONE]\n\n").encode()

    def stream_error(self, error: bytes) -> bytes:
        return b"data: " + error + b"\n\n"

    def _whole(self, kind: str, response: pb.GenerateResponse, content) -> bytes:
        """A non-streamed reply: one choice per output, `content(output)` its text part, usage over all."""
        return _DUMPS({"id": f"{self.id_prefix}{self.request_id}", "object": kind, "created": self.created,
                       "model": self.model,
                       "choices": [{"index": i, **content(out), "logprobs": self.logprobs_json(out.logprobs, 0),
                                    "finish_reason": FINISH.get(out.finish_reason, "stop")}
                                   for i, out in enumerate(response.outputs)],
                       "usage": usage_json(_sum_usage([o.usage for o in response.outputs], self.n))}).encode()

    def logprobs_json(self, logprobs, offset: int) -> dict | None:
        raise NotImplementedError


class ChatStream(_OpenAIStream):
    kind = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._roles_sent: set[int] = set()

    def chunk(self, chunk: pb.GenerateChunk) -> bytes:
        delta = {"content": chunk.text}
        if chunk.index not in self._roles_sent:  # the role goes with a choice's first delta
            self._roles_sent.add(chunk.index)
            delta = {"role": "assistant", "content": chunk.text}
        finish = "null"
        if chunk.finish_reason:
            finish = f'"{FINISH[chunk.finish_reason]}"'
            self.usages[chunk.index] = chunk.usage
        logprobs = _DUMPS(self.logprobs_json(chunk.logprobs, 0)) if chunk.logprobs else "null"
        return (f'{self._head}{{"index":{chunk.index},"delta":{_DUMPS(delta)},"logprobs":{logprobs},'
                f'"finish_reason":{finish}}}]}}\n\n').encode()

    def unary(self, response: pb.GenerateResponse) -> bytes:
        return self._whole("chat.completion", response, lambda out: {
            "message": {"role": "assistant", "content": out.text}})

    def logprobs_json(self, logprobs, offset: int) -> dict | None:
        """OpenAI's chat form: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        if not logprobs:
            return None
        return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                                              for t in lp.top]} for lp in logprobs]}


class CompletionStream(_OpenAIStream):
    kind = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def chunk(self, chunk: pb.GenerateChunk) -> bytes:
        finish = "null"
        if chunk.finish_reason:
            finish = f'"{FINISH[chunk.finish_reason]}"'
            self.usages[chunk.index] = chunk.usage
        logprobs = "null"
        if chunk.logprobs:
            offset = self._offsets.get(chunk.index, 0)
            logprobs = _DUMPS(self.logprobs_json(chunk.logprobs, offset))
            self._offsets[chunk.index] = offset + sum(len(lp.token) for lp in chunk.logprobs)
        return (f'{self._head}{{"index":{chunk.index},"text":{_DUMPS(chunk.text)},"logprobs":{logprobs},'
                f'"finish_reason":{finish}}}]}}\n\n').encode()

    def unary(self, response: pb.GenerateResponse) -> bytes:
        return self._whole("text_completion", response, lambda out: {"text": out.text})

    def logprobs_json(self, logprobs, offset: int) -> dict | None:
        """OpenAI's completions form: parallel lists tokens, token_logprobs, top_logprobs ({token: logprob}) and
        text_offset (each token's start in the completion, by its text's length)."""
        if not logprobs:
            return None
        offsets = []
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.token)
        return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs], "text_offset": offsets}


def models_json(models: pb.ListModelsResponse) -> bytes:
    return _DUMPS({"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "llamagrid",
                                               "max_model_len": m.max_context} for m in models.models]}).encode()

