"""MosaicML's inference API (`mcli predict`, MLflow AI Gateway's `mosaicml` provider), translated to and from the
router's own requests.

`POST /{model}/v1/predict` with `{"inputs": [prompt, ...], "parameters": {...}}` answers `{"outputs": [text, ...]}`;
`POST /{model}/v1/predict_stream` (one input) answers newline-delimited JSON: `{"outputs": [delta]}` per piece of
text, then `{"outputs": [""], "finish_reason": ..., "usage": {...}}`. An error is one JSON object with an `error`
object carrying `message` (MLflow's handler reads it; mcli's stream reader parses every line and never looks at
the status)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequest
from protos.llamagrid.v1 import inference_pb2 as pb
from router.http.exchange import MAX_UINT32, Exchange, Renames, sampling
from router.http.openai_api import FINISH, usage_json

_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# parameters honoured (name -> SamplingParameters field, checked by the router and the workers)
PARAMETERS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "seed": "seed", "stop": "stop", "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos",
              "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
              "min_new_tokens": "min_new_tokens"}


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    inputs: list[str] | str = Field(..., description="Prompts, each completed independently (one to stream).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="max_new_tokens, temperature, top_p, top_k, "
                                       "seed, stop, repetition_penalty, ignore_eos, presence_penalty, "
                                       "frequency_penalty, min_new_tokens, do_sample, n (1).")


def _parameters(raw: dict[str, Any]) -> pb.SamplingParameters:
    values: dict[str, Any] = {}
    n = 1
    for name, value in raw.items():
        field = f"parameters.{name}"
        if name == "n":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise InvalidRequest(field, "must be an integer between 1 and 16")
            n = value
        elif name == "do_sample":  # (Hugging Face's switch: false is greedy)
            if not isinstance(value, bool):
                raise InvalidRequest(field, "must be true or false")
            if not value:
                values["temperature"] = 0.0
        elif name not in PARAMETERS:
            raise InvalidRequest(field, f"is not a known parameter ({', '.join(PARAMETERS)}, do_sample, n)")
        elif value is None:
            continue
        elif name == "stop":
            stop = [value] if isinstance(value, str) else value
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise InvalidRequest(field, "must be a string or a list of strings")
            values["stop"] = stop
        elif name == "ignore_eos":
            if not isinstance(value, bool):
                raise InvalidRequest(field, "must be true or false")
            values["ignore_eos"] = value
        elif name in ("max_new_tokens", "top_k", "seed", "min_new_tokens"):
            if isinstance(value, bool) or not isinstance(value, int) or (
                    name != "seed" and not 0 <= value <= MAX_UINT32):
                raise InvalidRequest(field, "must be a non-negative integer" if name != "seed" else "must be an "
                                                                                                 "integer")
            values[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(field, "must be a number")
            values.setdefault(name, float(value))  # (do_sample: false wins over a temperature)
    params = sampling(**values)
    if n > 1:  # (outputs: the n completions of each input in turn)
        params.n = n
    return params


def predict_exchange(model: str, body: PredictRequest, stream: bool) -> Exchange:
    inputs = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not inputs:
        raise InvalidRequest("inputs", "at least one input is required")
    request = pb.GenerateRequest(model=model, inputs=inputs, parameters=_parameters(body.parameters))
    if stream and (len(inputs) != 1 or request.parameters.n > 1):
        raise InvalidRequest("inputs", "streaming takes one input and one completion (n = 1)")
    renames: Renames = (("inputs[0]", "inputs[0]" if len(inputs) > 1 or not isinstance(body.inputs, str)
                         else "inputs"),)
    return PredictStream(request, renames, stream)


class PredictStream(Exchange):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.media_type = "application/x-ndjson" if self.stream else "application/json"

    def chunk(self, chunk: pb.GenerateChunk) -> bytes:
        if not chunk.finish_reason:
            return b'{"outputs":[' + _DUMPS(chunk.text).encode() + b"]}\n"
        last = {"outputs": [chunk.text], "finish_reason": FINISH[chunk.finish_reason], "usage": usage_json(chunk.usage)}
        return _DUMPS(last).encode() + b"\n"

    def unary(self, response: pb.GenerateResponse) -> bytes:
        return _DUMPS({"outputs": [out.text for out in response.outputs]}).encode()
