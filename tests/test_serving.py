"""The Ray Serve application end to end: OpenAI HTTP API, gRPC, errors, overload, disconnects."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import psutil
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

from specserve.config import EngineConfig  # noqa: E402
from specserve.deployments.app import build_app  # noqa: E402
from specserve.deployments.client import SpecServeClient  # noqa: E402
from specserve.deployments.grpc import specserve_pb2 as pb  # noqa: E402
from specserve.engine.llm_engine import LLMEngine  # noqa: E402
from specserve.engine.sampling_params import SamplingParams  # noqa: E402

HTTP_PORT, GRPC_PORT, METRICS_PORT = 18000, 19000, 18080
BASE = f"http://127.0.0.1:{HTTP_PORT}"
SERVICER = "specserve.deployments.grpc.specserve_pb2_grpc.add_SpecServeServicer_to_server"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """Three applications on one local Ray: 'specserve' (the tiny model, its engine in a process
    of its own, the default), 'busy' (a slower model with one KV slot and room for one waiting
    request, so that requests overlap and a third concurrent one is refused; its engine in a
    thread of the replica) and 'tp' (TP=2 with rank 1 a Ray actor in the replica's placement
    group, started from the replica's engine process). Yields the handles of the first two."""
    # A loaded CI machine can take longer than Serve's 5 s to start its proxy.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # export metrics within a second
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT)
    serve.start(
        http_options={"host": "127.0.0.1", "port": HTTP_PORT},
        grpc_options={"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER]},
    )
    engine = {"model": str(tiny_model), "max_num_seqs": 2, "max_model_len": 256}
    serve.run(build_app({"engine": engine, "model_name": "tiny", "num_cpus": 0}), name="specserve", route_prefix="/")
    slow_model = build_tiny_model(tmp_path_factory.mktemp("slow-llama"), hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=8, max_position_embeddings=1024)
    busy = {"model": str(slow_model), "max_num_seqs": 1, "max_model_len": 1024}
    serve.run(build_app({"engine": busy, "model_name": "slow", "max_waiting_requests": 1, "num_cpus": 0,
                         "engine_process": False}),
              name="busy", route_prefix="/busy")
    tp = {"model": str(tiny_model), "max_num_seqs": 2, "max_model_len": 256, "tensor_parallel_size": 2,
          "worker_backend": "ray", "collective_timeout_s": 10}
    serve.run(build_app({"engine": tp, "model_name": "tiny", "num_cpus": 0.5, "torch_threads": 1}),
              name="tp", route_prefix="/tp")
    yield {"specserve": serve.get_app_handle("specserve"), "busy": serve.get_app_handle("busy")}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy outputs of the in-process engine, to compare the served ones with."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=2, max_model_len=256))

    def run(prompt, max_tokens: int) -> str:
        request = engine.make_request("ref", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        engine.add_request(request)
        final = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                final = output
        return final.output.text

    yield run, engine
    engine.shutdown()


def _post(path: str, body: bytes | dict) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_models_and_health(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(BASE + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_completion_matches_in_process_engine(client, reference):
    run, _ = reference
    reply = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert reply.choices[0].text == run("The quick brown fox", 12)
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    stats = reply.model_extra["specserve"]
    assert stats["ttft_ms"] > 0 and stats["tpot_slo_ms"] == 120.0 and stats["slo_attained"] is True


def test_streamed_completion_equals_unary(client):
    unary = client.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_echo_returns_the_prompt_and_its_logprobs_as_the_engine_scores_them(client, reference):
    """What lm-eval's loglikelihood asks: echo, logprobs, and max_tokens 0 or more."""
    _, engine = reference
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = engine.tokenizer.encode(prompt)
    request = engine.make_request("scored", ids, SamplingParams(max_tokens=0, prompt_logprobs=1))
    engine.add_request(request)
    while engine.has_unfinished_requests():
        scored = engine.step()
    expected = [row[token] for row, token in zip(scored[0].prompt_logprobs[1:], ids[1:])]

    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == prompt and reply.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [engine.tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) in (1, 2) for top in choice.logprobs.top_logprobs[1:])

    run, _ = reference
    generated = client.completions.create(model="tiny", prompt=[ids], max_tokens=5, echo=True, logprobs=0,
                                          temperature=0)
    assert generated.choices[0].text == engine.tokenizer.decode(ids) + run(prompt, 5)
    assert len(generated.choices[0].logprobs.tokens) == len(ids) + 5
    assert generated.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-5)
    chunks = [c.choices[0] for c in client.completions.create(
        model="tiny", prompt=[ids], max_tokens=5, echo=True, logprobs=0, temperature=0, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == generated.choices[0].text
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(generated.choices[0].logprobs.token_logprobs[1:], abs=1e-5)

    # vLLM's prompt_logprobs beside echo's (the engine computes the larger count; each gets its own)
    both = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                     extra_body={"prompt_logprobs": 3})
    assert all(len(top) == 1 for top in both.choices[0].logprobs.top_logprobs[1:])
    rows = both.choices[0].model_extra["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)
    assert [row[str(token)]["logprob"] for row, token in zip(rows[1:], ids[1:])] == pytest.approx(expected, abs=1e-5)
    assert all(3 <= len(row) <= 4 for row in rows[1:])
    assert rows[1][str(ids[1])]["decoded_token"] == engine.tokenizer.decode([ids[1]])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == len(engine.apply_chat_template(
        [{"role": "user", "content": prompt}]))
    status, error, _ = _post("/v1/completions", {"prompt": prompt, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and error["error"]["param"] == "prompt_logprobs"


def test_tokenizer_endpoints_tokenize_as_the_engine_does(server, reference):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer uses them)."""
    _, engine = reference
    status, tokenized, _ = _post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert status == 200 and tokenized["tokens"] == engine.tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 256
    messages = [{"role": "user", "content": "Hi"}]
    status, chat, _ = _post("/tokenize", {"messages": messages})
    assert status == 200 and chat["tokens"] == engine.apply_chat_template(messages)
    status, text, _ = _post("/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200 and text == {"prompt": "Hello world"}
    with urllib.request.urlopen(BASE + "/tokenizer_info") as response:
        info = json.loads(response.read())
    assert info["eos_token"] == engine.tokenizer.eos_token and info["model_max_length"] == 256
    for path, body, param in [("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "messages": messages}, None),
                              ("/tokenize", {"prompt": "a\ud800"}, "prompt")]:
        status, error, _ = _post(path, body)
        assert status == 400 and error["error"]["param"] == param and error["error"]["message"]


def test_structured_outputs_over_http_and_grpc_match_the_in_process_engine(client, reference):
    """OpenAI's response_format (JSON schema) on chat, vLLM's structured_outputs (choice) on
    completions and over gRPC (regex): the outputs match and equal the engine's own."""
    from specserve.engine.sampling_params import StructuredOutput

    _, engine = reference

    def in_process(prompt, structured: StructuredOutput) -> str:
        request = engine.make_request("structured", prompt, SamplingParams(max_tokens=40, temperature=0,
                                                                           structured=structured))
        engine.add_request(request)
        while engine.has_unfinished_requests():
            finals = engine.step()
        return finals[0].output.text

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    messages = [{"role": "user", "content": "A color?"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": schema}})
    text = reply.choices[0].message.content
    assert json.loads(text)["color"] in ("red", "green") and reply.choices[0].finish_reason == "stop"
    assert text == in_process(engine.apply_chat_template(messages), StructuredOutput(json_schema=schema))

    choices = ["quick fox", "lazy dog"]
    completion = client.completions.create(model="tiny", prompt="The", max_tokens=40, temperature=0,
                                           extra_body={"structured_outputs": {"choice": choices}})
    assert completion.choices[0].text in choices
    assert completion.choices[0].text == in_process("The", StructuredOutput(choice=choices))

    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        reply = grpc_client.generate(prompt="The", max_tokens=40, temperature=0,
                                     structured_outputs={"regex": "[a-z]{3,6}!"})
        assert re.fullmatch("[a-z]{3,6}!", reply.text) and reply.finish_reason == "stop"
        with pytest.raises(grpc.RpcError) as failed:
            grpc_client.generate(prompt="The", structured_outputs={"regex": "(unclosed"})
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]


def test_tool_calls_of_a_named_or_required_tool_choice(client):
    """A named function: its arguments match its schema, unary and streamed alike; 'required':
    calls of the given functions (or, cut by the token limit, text)."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                           max_tokens=40, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "stop"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    assert reply.choices[0].message.content is None
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                                 max_tokens=40, temperature=0, stream=True))
    streamed = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [
        (0, "get_weather", call.function.arguments)]

    required = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                              max_tokens=60, temperature=0)
    choice = required.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls and {c.function.name for c in choice.message.tool_calls} <= {
            "get_weather", "get_time"}
    else:
        assert choice.finish_reason == "length" and choice.message.content


def test_a_conversation_with_a_tool_call_and_its_result_goes_on(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "18 C, sunny"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


@pytest.mark.parametrize("body", [
    {"tools": TOOLS},  # tool_choice "auto" (the default with tools) needs a tool-call parser
    {"tools": TOOLS, "tool_choice": "auto"},
    {"tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
])
def test_unservable_tool_choices_are_400s(server, body):
    status, error, _ = _post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    assert status == 400 and error["error"]["param"] == "tool_choice" and error["error"]["message"]


def test_a_tool_whose_parameters_are_no_schema_is_a_400_naming_tools(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]
    status, error, _ = _post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "tools": tools, "tool_choice": "required"})
    assert status == 400 and error["error"]["param"] == "tools" and "bogus" in error["error"]["message"]


def test_chat_streaming_and_not(client, reference):
    run, engine = reference
    messages = [{"role": "user", "content": "Hello"}]
    expected = run(engine.apply_chat_template(messages), 8)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].model_extra["specserve"]["tpot_ms"] > 0


def test_n_choices_are_seeded_apart_and_reproducible(client):
    """n choices are n requests; with a seed, choice i samples with seed ^ i (choice 0 with the
    seed itself), so each choice can be had alone."""
    body = dict(model="tiny", prompt="Once upon a", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    many = client.completions.create(**body, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.text for c in many.choices}) > 1
    assert many.choices[2].text == client.completions.create(**body, seed=7 ^ 2).choices[0].text
    single = client.completions.create(**body, seed=7)
    assert many.choices[0].text == single.choices[0].text
    assert many.usage.prompt_tokens == single.usage.prompt_tokens and many.usage.completion_tokens == 24
    assert many.model_extra["specserve"]["tpot_ms"] > 0


def test_a_batch_of_prompts_gets_n_choices_each_in_order(client, reference):
    run, _ = reference
    prompts = ["The quick brown fox", "Hello world"]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [run(p, 5) for p in prompts for _ in range(2)]
    singles = [client.completions.create(model="tiny", prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts]
    assert reply.usage.prompt_tokens == sum(singles) and reply.usage.completion_tokens == 20
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_logit_bias_forces_a_token_over_http_and_grpc(client, reference):
    _, engine = reference
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                      logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == engine.tokenizer.decode([42] * 4)
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        assert list(grpc_client.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True,
                                         logit_bias={42: 100.0}).token_ids) == [42] * 4
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.generate("Hello", logit_bias={42: 500.0})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in info.value.details()


def test_penalties_reach_the_engine_over_http_and_grpc(client, reference):
    run, engine = reference
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    request = engine.make_request("penalized", "Hello", params)
    engine.add_request(request)
    while engine.has_unfinished_requests():
        for output in engine.step():
            expected = output.output.text
    assert expected != run("Hello", 12)  # the penalty changes this prompt's greedy text
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                      frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        assert grpc_client.generate("Hello", max_tokens=12, temperature=0, ignore_eos=True,
                                    frequency_penalty=2.0).text == expected
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.generate("Hello", repetition_penalty=0.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty" in info.value.details()


def test_n_streamed_chat_choices_equal_the_unary_ones(client):
    body = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.9, seed=3,
                n=2, extra_body={"ignore_eos": True})
    unary = client.chat.completions.create(**body)
    texts, finishes, usage, stats = ["", ""], {}, None, None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
        stats = chunk.model_extra.get("specserve") or stats
    assert texts == [c.message.content for c in unary.choices]
    assert finishes == {0: "length", 1: "length"} and usage.completion_tokens == 12
    assert stats["slo_attained"] in (True, False) and stats["tpot_ms"] > 0


def test_a_disconnect_aborts_every_choice(server):
    replica = server["specserve"]
    before = replica.stats.remote().result()["outcomes"].get("abort", 0)
    body = json.dumps({"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "n": 2, "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(
        BASE + "/v1/completions", data=body, headers={"Content-Type": "application/json"}))
    assert response.readline().startswith(b"data: ")
    response.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = replica.stats.remote().result()
        if stats["outcomes"].get("abort", 0) >= before + 2 and stats["load"]["running"] == 0:
            break
        time.sleep(0.2)
    assert stats["outcomes"].get("abort", 0) == before + 2 and stats["load"]["running"] == 0


def test_slo_extension_fields(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        extra_body={"slo_class": "interactive", "ttft_slo_ms": 9000},
    )
    stats = reply.model_extra["specserve"]
    assert stats["tpot_slo_ms"] == 60.0 and stats["ttft_slo_ms"] == 9000.0


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "x", "slo_class": "nope"}, "slo_class"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 65}, "n"),
    ({"prompt": ["a"] * 33, "n": 2}, "n"),  # 66 choices
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (b"{not json", None),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": ["", "y"]}, "stop"),
    (b'{"prompt": "a\\ud800"}', "prompt"),  # a lone surrogate: valid JSON, not valid text
    ({"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}},
     "structured_outputs"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    status, error, _ = _post("/v1/completions", body)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param
    assert error["error"]["message"]


def test_unknown_model_is_404_and_client_raises(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)


def test_grpc_unary_and_stream_match_http(client):
    http = client.completions.create(model="tiny", prompt="Serving large", max_tokens=9, temperature=0)
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        reply = grpc_client.generate("Serving large", max_tokens=9, temperature=0, slo_class="batch")
        assert reply.text == http.choices[0].text and reply.finish_reason == "length"
        assert reply.usage.completion_tokens == 9 and reply.stats.tpot_slo_ms == 400.0
        parts = list(grpc_client.stream("Serving large", max_tokens=9, temperature=0))
        assert "".join(p.text for p in parts) == reply.text
        assert parts[-1].finish_reason == "length" and all(not p.finish_reason for p in parts[:-1])
        chat = grpc_client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
        assert chat.usage.completion_tokens == 3


def test_grpc_logprobs_match_http(client):
    http = client.completions.create(model="tiny", prompt="Serving large", max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"prompt_logprobs": 1})
    expected = http.choices[0].logprobs
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        reply = grpc_client.generate("Serving large", max_tokens=6, temperature=0, logprobs=2, prompt_logprobs=1)
        assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
        assert [lp.logprob for lp in reply.logprobs] == pytest.approx(expected.token_logprobs, abs=1e-5)
        for entry, top in zip(reply.logprobs, expected.top_logprobs):
            assert [t.logprob for t in entry.top] == pytest.approx(sorted(top.values(), reverse=True)[:2], abs=1e-5)
        prompt_rows = http.choices[0].model_extra["prompt_logprobs"][1:]
        assert [lp.logprob for lp in reply.prompt_logprobs] == pytest.approx(
            [row[str(lp.token_id)]["logprob"] for row, lp in zip(prompt_rows, reply.prompt_logprobs)], abs=1e-5)
        assert len(reply.prompt_logprobs) == len(prompt_rows) and all(len(lp.top) == 1 for lp in reply.prompt_logprobs)
        parts = list(grpc_client.stream("Serving large", max_tokens=6, temperature=0, logprobs=0))
        streamed = [lp for part in parts for lp in part.logprobs]
        assert [lp.token_id for lp in streamed] == list(reply.token_ids) and all(not lp.top for lp in streamed)
        assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in reply.logprobs], abs=1e-5)
        chat = grpc_client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
                                    logprobs=1)
        assert len(chat.logprobs) == 3 and all(len(lp.top) == 1 for lp in chat.logprobs)
        assert not grpc_client.generate("Serving large", max_tokens=3).logprobs  # not asked for
        with pytest.raises(grpc.RpcError) as info:
            list(grpc_client.stream("Serving large", max_tokens=3, prompt_logprobs=1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.generate("Serving large", logprobs=21)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in info.value.details()


def test_grpc_tool_calls_match_http(client):
    """Tools over gRPC: the same calls as over HTTP for a named function, unary and streamed (no
    text, the calls on the last response); a tool turn's result goes on; what HTTP refuses with
    a 400 is INVALID_ARGUMENT naming the field."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    http = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                          max_tokens=40, temperature=0)
    (expected,) = http.choices[0].message.tool_calls
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        reply = grpc_client.generate(messages=messages, tools=TOOLS, tool_choice="get_weather", max_tokens=40,
                                     temperature=0)
        (call,) = reply.tool_calls
        assert (call.name, call.arguments) == ("get_weather", expected.function.arguments) and call.id
        assert reply.text == "" and reply.finish_reason == "stop"
        parts = list(grpc_client.stream(messages=messages, tools=TOOLS, tool_choice=named, max_tokens=40,
                                        temperature=0))
        assert all(not p.text and not p.tool_calls for p in parts[:-1]) and not parts[-1].text
        assert [(c.name, c.arguments) for c in parts[-1].tool_calls] == [(call.name, call.arguments)]
        assert [t for p in parts for t in p.token_ids] == list(reply.token_ids)

        required = grpc_client.generate(messages=messages, tools=TOOLS, tool_choice="required", max_tokens=60,
                                        temperature=0)
        if required.finish_reason == "tool_calls":
            assert required.tool_calls and {c.name for c in required.tool_calls} <= {"get_weather", "get_time"}
        else:
            assert required.finish_reason == "length" and required.text and not required.tool_calls

        turns = messages + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
            {"role": "tool", "tool_call_id": "call-1", "content": "18 C, sunny"},
        ]
        text = client.chat.completions.create(model="tiny", messages=turns, tools=TOOLS, tool_choice="none",
                                              max_tokens=8, temperature=0).choices[0].message.content
        assert grpc_client.generate(messages=turns, tools=TOOLS, tool_choice="none", max_tokens=8,
                                    temperature=0).text == text

        for fields, param in [({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
                              ({"tool_choice": "nope", "tools": TOOLS}, "tool_choice"),
                              ({"tools": [{"function": {"name": "f", "parameters": {"type": "bogus"}}}],
                                "tool_choice": "required"}, "tools")]:
            with pytest.raises(grpc.RpcError) as info:
                grpc_client.generate(messages=messages, **fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param in info.value.details()
        for request in [pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")],
                                           tools=[pb.Tool(name="f", parameters="{not json")], tool_choice="f"),
                        pb.GenerateRequest(prompt="x", tools=[pb.Tool(name="f")], tool_choice="f")]:
            with pytest.raises(grpc.RpcError) as info:
                grpc_client._stub.Generate(request, metadata=grpc_client._metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools" in info.value.details()


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_grpc_bad_request_is_invalid_argument(server, call):
    with SpecServeClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        with pytest.raises(grpc.RpcError) as info:
            list(getattr(grpc_client, call)("x", temperature=-1.0)) if call == "stream" else \
                grpc_client.generate("x", temperature=-1.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "temperature" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.generate("x", messages=[{"role": "user", "content": "y"}])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overload_gets_429_with_retry_after(server):
    """'busy' has one KV slot and admits one waiting request; the rest are refused."""
    body = {"prompt": "Hello", "max_tokens": 600, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _post("/busy/v1/completions", body), range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 2 and 429 in statuses
    refused = next((error, headers) for status, error, headers in results if status == 429)
    assert refused[0]["error"]["type"] == "rate_limit_error" and int(refused[1]["retry-after"]) >= 1


def test_grpc_overload_is_resource_exhausted(server):
    def call(_):
        with SpecServeClient(f"127.0.0.1:{GRPC_PORT}", application="busy") as grpc_client:
            try:
                grpc_client.generate("Hello", max_tokens=600, ignore_eos=True, temperature=0)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(8)))
    assert codes.count(grpc.StatusCode.OK) >= 2 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_client_disconnect_aborts_and_frees_the_slot(server):
    busy = server["busy"]
    before = busy.stats.remote().result()["outcomes"].get("abort", 0)
    body = json.dumps({"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(BASE + "/busy/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request)
    assert response.readline().startswith(b"data: ")  # generating
    response.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = busy.stats.remote().result()
        if stats["outcomes"].get("abort", 0) > before and stats["load"]["running"] == 0:
            break
        time.sleep(0.2)
    assert stats["outcomes"].get("abort", 0) == before + 1
    assert stats["load"]["running"] == 0 and stats["load"]["kv_usage"] == 0.0
    assert stats["speculation"]["steps"] == 0  # this replica does not speculate


def test_autoscaling_stats_are_reported(server):
    stats = server["specserve"].record_autoscaling_stats.remote().result()
    assert set(stats) == {"waiting", "kv_usage", "on_track"}
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("protocol, extra", [("http", []), ("http", ["--stream", "--chat"]),
                                             ("grpc", []), ("grpc", ["--stream"])])
def test_cli_client(server, capsys, protocol, extra):
    from specserve.cli import main

    argv = ["client", "The quick brown fox", "--protocol", protocol, "--max-tokens", "6", "--stats",
            "--url", f"{BASE}/v1", "--grpc-target", f"127.0.0.1:{GRPC_PORT}", *extra]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "tpot_ms" in err


def test_cli_client_reports_errors(server, capsys):
    from specserve.cli import main

    for protocol in ("http", "grpc"):
        assert main(["client", "x", "--protocol", protocol, "--slo-class", "nope", "--url", f"{BASE}/v1",
                     "--grpc-target", f"127.0.0.1:{GRPC_PORT}"]) == 2
        assert "slo" in capsys.readouterr().err.lower()


def test_prometheus_metrics_are_exported(client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    wanted = ["ray_specserve_ttft_seconds_bucket", "ray_specserve_requests_total", "ray_specserve_kv_usage",
              "ray_specserve_waiting_requests", "ray_specserve_on_track"]
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics") as response:
            text = response.read().decode()
        missing = [name for name in wanted if name not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"not exported: {missing}"
    assert 'finish_reason="length"' in text and 'model="tiny"' in text


def test_dead_tp_worker_fails_requests_and_the_replica_recovers(server, reference):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
    status, reply, _ = _post("/tp/v1/completions", body)
    assert status == 200
    expected = reply["choices"][0]["text"]
    assert expected == reference[0]("Hello", 6)  # TP=2 with a Ray rank, as TP=1
    # Ray titles an actor's process "ray::<class>" (the state API would need the dashboard).
    workers = [p for p in psutil.process_iter(["cmdline"])
               if any("ray::TensorParallelWorker" in part for part in p.info["cmdline"] or ())]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)  # the worker process crashes
    status, error, headers = _post("/tp/v1/completions", body)
    assert status in (500, 503) and error["error"]["type"] == "server_error"
    assert error["error"]["message"].startswith(("generation failed", "this replica's engine has stopped"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve's health check replaces the replica
        status, reply, headers = _post("/tp/v1/completions", body)
        if status == 200:
            break
        assert status in (500, 503)
        time.sleep(2)
    assert status == 200 and reply["choices"][0]["text"] == expected

