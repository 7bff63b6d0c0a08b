"""The router's HTTP edge through clients nobody here wrote: the `openai` package and `mosaicml-cli`'s predict,
against a router (on its own loop in a thread) in front of real tiny workers; the text matches the gRPC API's for
the same request. Errors: OpenAI's JSON, the right statuses, a 429 the openai package waits out as told."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from common.internal_auth import INTERNAL_TOKEN_ENV  # noqa: F401 - (the second real worker wants the token)
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from tests.support.router import auth, config_for, new_keys, serve_router
from tests.support.workers import INTERNAL_TOKEN

TIERS = """
[tiers.gen]
requests_per_minute = 60000
tokens_per_minute = 10000000

[tiers.quick]
requests_per_minute = 120
tokens_per_minute = 10000000
request_burst = 1

[tiers.shared]
requests_per_minute = 1
tokens_per_minute = 10000000
request_burst = 2
"""
GREEDY = pb.SamplingParameters(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def keys(redis_server) -> dict[str, str]:
    made = new_keys(redis_server.url, {"gen": "gen", "quick": "quick", "shared": "shared",
                                       "elsewhere": ("gen", ["another-model"])}, prefix="http")
    return {name: k.plaintext for name, k in made.items()}


@pytest.fixture(scope="module")
def router(real_workers, redis_server, keys, tmp_path_factory):
    tiers = tmp_path_factory.mktemp("http-tiers") / "tiers.toml"
    tiers.write_text(TIERS)
    config = config_for(real_workers, redis_server.url, tiers, http_port=0, internal_token=INTERNAL_TOKEN)
    with serve_router(config, num_workers=2) as handle:
        yield handle


@pytest.fixture(scope="module")
def model(router) -> str:
    return router.pool.default_model()


@pytest.fixture(scope="module")
def client(router, keys) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=keys["gen"], max_retries=0, timeout=60)


def _grpc_generate(router, key: str, request: pb.GenerateRequest) -> pb.GenerateResponse:
    with grpc.insecure_channel(router.address) as ch:
        return pb_grpc.InferenceStub(ch).Generate(request, metadata=auth(key), timeout=60)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def test_chat_completions_match_grpc_streamed_and_not(router, client, model, keys):
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(
        model=model, parameters=GREEDY, conversations=[pb.Conversation(messages=[
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES])])).outputs[0]
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == pb.LENGTH else "stop")
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == model and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def test_penalties_pass_through_to_the_engine(router, client, model, keys):
    params = pb.SamplingParameters(max_new_tokens=12, temperature=0.0, presence_penalty=1.5, frequency_penalty=2.0,
                                   min_new_tokens=6)
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=["Once upon"],
                                                                     parameters=params)).outputs[0]
    plain = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=["Once upon"],
                                                                  parameters=GREEDY)).outputs[0]
    reply = client.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=0,
                                      presence_penalty=1.5, frequency_penalty=2.0, extra_body={"min_tokens": 6})
    assert reply.choices[0].text == expected.text != plain.text


def test_logprobs_through_grpc_and_both_openai_forms(router, client, model, keys):
    params = pb.SamplingParameters(max_new_tokens=8, temperature=0.0, logprobs=3)
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(
        model=model, parameters=params, conversations=[pb.Conversation(messages=[
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES])])).outputs[0]
    assert [lp.token_id for lp in expected.logprobs] == list(expected.token_ids)
    assert all(len(lp.top) == 3 and lp.top[0].logprob >= lp.logprob - 1e-6 for lp in expected.logprobs)
    want = [(lp.token, round(lp.logprob, 5), [t.token for t in lp.top]) for lp in expected.logprobs]
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    got = [(c.token, round(c.logprob, 5), [t.token for t in c.top_logprobs]) for c in reply.choices[0].logprobs.content]
    assert got == want
    streamed = [c for chunk in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5), [t.token for t in c.top_logprobs]) for c in streamed] == want
    completion = client.completions.create(model=model, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == completion.choices[0].text or completion.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=21)
    assert err.value.body["param"] == "top_logprobs"


def test_structured_output_through_grpc_and_openai_response_format(router, client, model, keys):
    import jsonschema

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {
        "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["colour", "n"], "additionalProperties": False}
    params = pb.SamplingParameters(max_new_tokens=64, temperature=0.0, json_schema=json.dumps(schema))
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=["Pick one:"],
                                                                     parameters=params)).outputs[0]
    jsonschema.validate(json.loads(expected.text), schema)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=64, temperature=0.8, seed=3,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "pick", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=128, temperature=0,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})
    assert err.value.body["param"] == "response_format.json_schema.schema", err.value.body
    with grpc.insecure_channel(router.address) as ch, pytest.raises(grpc.RpcError) as rpc_err:
        bad = pb.GenerateRequest(model=model, inputs=["x"], parameters=pb.SamplingParameters(regex="(unclosed"))
        pb_grpc.InferenceStub(ch).Generate(bad, metadata=auth(keys["gen"]), timeout=30)
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_err.value.details().startswith("parameters.regex: cannot be compiled"), rpc_err.value.details()


def test_completions_one_or_many_prompts_and_models(router, client, model, keys):
    prompts = ["The capital of France is", "Once upon a time"]
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=prompts,
                                                                     parameters=GREEDY)).outputs
    reply = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [e.text for e in expected]
    assert reply.usage.completion_tokens == sum(e.usage.completion_tokens for e in expected)
    streamed = client.completions.create(model=model, prompt=prompts[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected[0].text
    assert [m.id for m in client.models.list()] == [model]


def test_errors_are_openai_errors_naming_the_field(router, client, model, keys):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=3)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, presence_penalty=2.5)
    assert err.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, n=17)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # a field the worker checks, named as the client sent it
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"repetition_penalty": 0})
    assert err.value.body["param"] == "repetition_penalty", err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1 << 40)
    assert err.value.body["param"] == "max_tokens", err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": 5}])
    assert err.value.body["param"].startswith("messages[0].content"), err.value.body
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "not_found"
    with pytest.raises(openai.PermissionDeniedError) as err:  # a key for other models only
        openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=keys["elsewhere"], max_retries=0).completions.create(
            model=model, prompt="hi", max_tokens=2)
    assert err.value.status_code == 403 and err.value.body["type"] == "permission_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="lg_nope", max_retries=0).models.list()
    request = urllib.request.Request(f"{router.http_url}/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"authorization": f"Bearer {keys['gen']}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_a_429_carries_its_wait_and_the_openai_client_waits_it_out(router, model, keys):
    quick = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=keys["quick"], max_retries=0, timeout=60)
    quick.models.list()  # the burst of one request is spent
    with pytest.raises(openai.RateLimitError) as err:
        quick.models.list()
    headers = err.value.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000 and headers["retry-after"] == "1"
    assert err.value.body["type"] == "rate_limit_error"
    patient = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=keys["quick"], max_retries=2, timeout=60)
    assert [m.id for m in patient.models.list()] == [model]  # retried after the wait it was told


def test_one_keys_limit_is_shared_by_grpc_and_http(router, model, keys):
    key = keys["shared"]  # a burst of 2 requests, then one a minute
    http = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=key, max_retries=0, timeout=60)
    with grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=10)
        http.models.list()
        with pytest.raises(openai.RateLimitError):
            http.models.list()
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_mcli_predict_streamed_and_not(router, model, keys, monkeypatch, tmp_path):
    from mcli.api.inference_deployments import predict

    monkeypatch.setenv("MOSAICML_API_KEY", keys["gen"])  # sent bare, as `authorization: <key>`
    monkeypatch.setenv("MCLI_CONFIG_DIR", str(tmp_path))
    url = f"{router.http_url}/{model}/v1"
    prompt = "[INST] Name three colours. [/INST]"
    expected = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=[prompt],
                                                                     parameters=GREEDY)).outputs[0]
    params = {"max_new_tokens": 12, "temperature": 0}
    assert predict(url, {"inputs": [prompt], "parameters": params}) == {"outputs": [expected.text]}
    lines = list(predict(url, {"inputs": [prompt], "parameters": params}, stream=True))
    assert "".join(line["outputs"][0] for line in lines) == expected.text
    assert lines[-1]["finish_reason"] in ("length", "stop") and lines[-1]["usage"]["completion_tokens"] > 0
    # the Llama-2 markup written out with its own leading <s> (MLflow's gateway): one BOS, the same reply
    assert predict(url, {"inputs": ["<s>" + prompt], "parameters": {**params, "n": 1}}) == {"outputs": [expected.text]}
    # an error is one JSON object with an error object, streamed or not
    lines = list(predict(url, {"inputs": [prompt], "parameters": {"temperature": -1}}, stream=True))
    assert lines[0]["error"]["param"] == "parameters.temperature", lines
    from mcli.api.exceptions import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        predict(url, {"inputs": [prompt], "parameters": {"nonsense": 1}})
    assert err.value.status == 400 and "parameters.nonsense" in str(err.value)
    # what does not fit is a 4xx naming the limit: a prompt past the context, a budget past the key's tier
    with pytest.raises(InferenceServerException) as err:
        predict(url, {"inputs": ["word " * 6000], "parameters": params})
    assert err.value.status == 400 and "inputs[0]" in str(err.value) and "context" in str(err.value), str(err.value)
    with pytest.raises(InferenceServerException) as err:
        predict(url, {"inputs": [prompt], "parameters": {"max_new_tokens": 20_000_000}})
    assert err.value.status == 400 and "at most 10000000" in str(err.value), str(err.value)


def test_probes_and_openapi_schema(router):
    for path, status in (("/health/live", 200), ("/health/ready", 200)):
        with urllib.request.urlopen(f"{router.http_url}{path}", timeout=10) as resp:
            assert resp.status == status
    with urllib.request.urlopen(f"{router.http_url}/openapi.json", timeout=10) as resp:
        schema = json.loads(resp.read())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/{model}/v1/predict"} <= set(schema["paths"])


def test_n_completions_share_one_prefill_and_bill_the_prompt_once(router, client, model, keys):
    prompt = "Write a line about the sea. " * 12  # several blocks of 16 tokens
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=5, n=4)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert len({c.text for c in reply.choices}) > 1, "four seeded streams, not one completion four times"
    # the prompt is counted once, and the three later completions found it in the prefix cache
    one = client.completions.create(model=model, prompt=prompt + " once", max_tokens=8, temperature=1.0, seed=5)
    assert reply.usage.prompt_tokens < 2 * one.usage.prompt_tokens
    grpc_reply = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=[prompt + " again"],
        parameters=pb.SamplingParameters(max_new_tokens=4, temperature=0.8, seed=9, n=4)))
    cached = sorted(o.usage.cached_prompt_tokens for o in grpc_reply.outputs)
    assert len(grpc_reply.outputs) == 4 and cached[1] >= 16 * 4, cached
    # seeded: the j-th completion is the same stream as a single request with seed + j
    for j in range(4):
        single = _grpc_generate(router, keys["gen"], pb.GenerateRequest(model=model, inputs=[prompt + " again"],
            parameters=pb.SamplingParameters(max_new_tokens=4, temperature=0.8, seed=9 + j)))
        assert single.outputs[0].token_ids == grpc_reply.outputs[j].token_ids
    streamed = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=1.0,
                                                   n=3, stream=True, stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1, 2}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", n=17)
    assert err.value.body["param"] == "n"


def test_a_chat_turn_asking_for_n_completions_is_refused_naming_the_field(router, keys):
    turn = pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="hi")],
                                           parameters=pb.SamplingParameters(n=2)))
    with grpc.insecure_channel(router.address) as ch, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.InferenceStub(ch).Chat(iter([turn]), metadata=auth(keys["gen"]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("turns[0].parameters.n: "), err.value.details()
