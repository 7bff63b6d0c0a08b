"""One HTTP request as the router's call bodies see it (a GenerateRequest) and as its client reads the result: the
base both HTTP APIs (OpenAI, MosaicML) fill in."""

from __future__ import annotations

from protos.llamagrid.v1 import inference_pb2 as pb
from router.http.status import error_body

Renames = tuple[tuple[str, str], ...]
MAX_UINT32 = (1 << 32) - 1  # the largest max_new_tokens or top_k the wire format holds


def sampling(**fields) -> pb.SamplingParameters:
    """SamplingParameters with only the fields given (None, False or an empty stop list: unset, so the model's
    defaults apply). A seed of any integer is accepted, as OpenAI's is, and reduced to the 64 bits the workers take."""
    params = pb.SamplingParameters()
    for name, value in fields.items():
        if value is None or value is False or (name == "stop" and not value):
            continue
        if name == "stop":
            params.stop.extend(value)
        else:
            setattr(params, name, value % (1 << 64) if name == "seed" else value)
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
