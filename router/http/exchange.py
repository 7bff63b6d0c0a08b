"""One HTTP request as the router's call bodies see it (a GenerateRequest) and as its client reads the result: the
base both HTTP APIs (OpenAI, MosaicML) fill in."""

from __future__ import annotations

from protos.llamagrid.v1 import inference_pb2 as pb
from router.http.status import error_body

Renames = tuple[tuple[str, str], ...]
MAX_UINT32 = (1 << 32) - 1  # the largest max_new_tokens or top_k the wire format holds


def sampling(*, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, stop=None,
             repetition_penalty=None, ignore_eos=None, presence_penalty=None, frequency_penalty=None,
             min_new_tokens=None) -> pb.SamplingParameters:
    """SamplingParameters with only the fields given (unset ones take the model's defaults). A seed of any
    integer is accepted, as OpenAI's is, and reduced to the 64 bits the workers take."""
    params = pb.SamplingParameters()
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if top_k is not None:
        params.top_k = top_k
    if seed is not None:
        params.seed = seed % (1 << 64)
    if stop:
        params.stop.extend(stop)
    if repetition_penalty is not None:
        params.repetition_penalty = repetition_penalty
    if ignore_eos:
        params.ignore_eos = True
    if presence_penalty is not None:
        params.presence_penalty = presence_penalty
    if frequency_penalty is not None:
        params.frequency_penalty = frequency_penalty
    if min_new_tokens is not None:
        params.min_new_tokens = min_new_tokens
    return params


def renamed(message: str, renames: Renames) -> str:
    """An error message whose leading field name ("inputs[0]: ...", "parameters.top_p: ...") is rewritten to the
    client's name for it (first matching prefix, matched on whole name parts)."""
    for ours, theirs in renames:
        if message.startswith(ours) and message[len(ours): len(ours) + 1] in (":", ".", "[", ""):
            return theirs + message[len(ours):]
    return message


class Exchange:
    """`request`: the router request; `renames`: how its field names read to the client; `stream`: whether the
    result is streamed. Subclasses write the result: `unary` (the whole response), or `chunk` per streamed message and
    `end` after the last; `stream_error` wraps an error that comes after the stream started."""

    media_type = "application/json"

    def __init__(self, request: pb.GenerateRequest, renames: Renames, stream: bool) -> None:
        self.request, self.renames, self.stream = request, renames, stream
        self.request_id = ""
        self.model = ""

    def begin(self, request_id: str, model: str) -> None:
        """Called once admitted, before anything is written: the request id and the model that serves it."""
        self.request_id, self.model = request_id, model

    def chunk(self, chunk: pb.GenerateChunk) -> bytes:
        raise NotImplementedError

    def end(self) -> bytes:
        return b""

    def unary(self, response: pb.GenerateResponse) -> bytes:
        raise NotImplementedError

    def error(self, status: int, code, message: str) -> bytes:
        return error_body(status, code, renamed(message, self.renames))

    def stream_error(self, error: bytes) -> bytes:
        return error + b"\n"
