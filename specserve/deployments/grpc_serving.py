"""The gRPC API over the same serving logic as HTTP: protobuf in, protobuf out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import ValidationError

from specserve.deployments.grpc import specserve_pb2 as pb
from specserve.deployments.openai_serving import Choice, OpenAIServing, bad_request, invalid_fields, most_likely
from specserve.deployments.protocol import ChatCompletionRequest, CompletionRequest
from specserve.deployments.stats import request_stats
from specserve.deployments.tools import calls_tools
from specserve.engine.request import RequestOutput

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "slo_class", "tpot_slo_ms", "ttft_slo_ms",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "prompt_logprobs")


def to_openai(request: pb.GenerateRequest, stream: bool = False) -> CompletionRequest | ChatCompletionRequest:
    """The equivalent OpenAI request body (validated the same way); raises a 400 ServingError."""
    if bool(request.prompt) == bool(request.messages):
        raise bad_request("set exactly one of prompt and messages", "prompt")
    fields = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
    if request.stop:
        fields["stop"] = list(request.stop)
    if request.logit_bias:
        fields["logit_bias"] = dict(request.logit_bias)
    if request.HasField("speculation"):
        s = request.speculation
        fields["speculation"] = {"depth": s.depth, "width": s.width or 1}
        if s.HasField("max_nodes"):
            fields["speculation"]["max_nodes"] = s.max_nodes
    if request.HasField("structured_outputs"):
        s = request.structured_outputs
        given = {"json": s.json or None, "json_object": s.json_object or None, "regex": s.regex or None,
                 "choice": list(s.choice) or None, "grammar": s.grammar or None}
        fields["structured_outputs"] = {name: value for name, value in given.items() if value is not None}
    fields["ignore_eos"] = request.ignore_eos
    fields["stream"] = stream
    logprobs = request.logprobs if request.HasField("logprobs") else None
    if request.prompt and (request.tools or request.HasField("tool_choice")):
        raise bad_request("tools and tool_choice need messages, not a prompt", "tools")
    try:
        if request.messages:
            if logprobs is not None:
                fields |= {"logprobs": True, "top_logprobs": logprobs}
            return ChatCompletionRequest(messages=[_message(m) for m in request.messages], **_tool_fields(request),
                                         **fields)
        return CompletionRequest(prompt=request.prompt, logprobs=logprobs, **fields)
    except ValidationError as exc:
        raise invalid_fields(exc.errors()) from exc


def _message(message: pb.ChatMessage) -> dict:
    """An OpenAI chat message: role and content, and a tool turn's calls, call id or name."""
    fields = {"role": message.role, "content": message.content}
    if message.tool_calls:
        fields["tool_calls"] = [{"id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": call.arguments}}
                                for call in message.tool_calls]
    return fields | {name: getattr(message, name) for name in ("tool_call_id", "name") if getattr(message, name)}


def _tool_fields(request: pb.GenerateRequest) -> dict:
    """OpenAI's tools and tool_choice of a request (a choice that is no keyword names a function)."""
    fields = {}
    if request.tools:
        tools = []
        for index, tool in enumerate(request.tools):
            function = {"name": tool.name, "description": tool.description or None}
            if tool.parameters:
                try:
                    function["parameters"] = json.loads(tool.parameters)
                except ValueError as exc:
                    raise bad_request(f"tools[{index}].parameters is not JSON: {exc}", "tools") from exc
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    if request.HasField("tool_choice"):
        choice = request.tool_choice
        keyword = choice in ("none", "auto", "required")
        fields["tool_choice"] = choice if keyword else {"type": "function", "function": {"name": choice}}
    return fields


def _choices(serving: OpenAIServing, body: CompletionRequest | ChatCompletionRequest) -> list[Choice]:
    """The request's one choice (the proto has one prompt and no ``n``)."""
    return serving.chat_choices(body) if isinstance(body, ChatCompletionRequest) else serving.completion_choices(body)


def _token_logprobs(tokens: list[int], rows: list[dict[int, float] | None], count: int) -> list[pb.TokenLogprob]:
    """Each token's log-probability and the ``count`` most likely tokens of its row (rows that
    are None, a prompt's first token's, are left out)."""
    return [
        pb.TokenLogprob(token_id=token, logprob=row[token], top=[
            pb.TopLogprob(token_id=k, logprob=v) for k, v in most_likely(row, count)
        ])
        for token, row in zip(tokens, rows) if row is not None
    ]


def _logprob_fields(request: pb.GenerateRequest, output: RequestOutput, new_tokens: int) -> dict:
    """The response's logprobs of the last ``new_tokens`` output tokens, and its prompt's once
    the request has finished, where the request asked for them."""
    fields = {}
    if request.HasField("logprobs"):
        end = len(output.output.token_ids)
        rows = (output.output.logprobs or [])[end - new_tokens : end]
        fields["logprobs"] = _token_logprobs(output.output.token_ids[end - new_tokens :], rows, request.logprobs)
    if request.HasField("prompt_logprobs") and output.finished:
        fields["prompt_logprobs"] = _token_logprobs(output.prompt_token_ids, output.prompt_logprobs,
                                                    request.prompt_logprobs)
    return fields


def _answer(body: CompletionRequest | ChatCompletionRequest, output: RequestOutput) -> dict:
    """A finished request's answer: its text, or (where a chat request's tools were called) its
    tool calls and no text; and its finish reason, as over HTTP."""
    if not isinstance(body, ChatCompletionRequest):
        return {"text": output.output.text, "finish_reason": output.output.finish_reason.value}
    message, reason = OpenAIServing.chat_message(body, output)
    calls = [pb.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
             for c in message.tool_calls or []]
    return {"text": message.content or "", "tool_calls": calls, "finish_reason": reason}


def _final_fields(output: RequestOutput) -> dict:
    stats = request_stats(output)
    spec = stats.speculation
    return {
        "usage": pb.Usage(prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(output.output.token_ids)),
        "stats": pb.RequestStats(
            **{k: v for k, v in stats.model_dump(exclude={"speculation"}).items() if v is not None},
            speculation_steps=spec.steps if spec else 0,
            accepted_tokens=spec.accepted if spec else 0,
            mean_accepted_tokens=spec.mean_accepted_tokens if spec else 0.0,
        ),
    }


async def generate(serving: OpenAIServing, request: pb.GenerateRequest) -> pb.GenerateResponse:
    body = to_openai(request)
    (output,) = await serving.choice_outputs(_choices(serving, body))
    tokens = output.output.token_ids
    return pb.GenerateResponse(token_ids=tokens, **_answer(body, output), **_final_fields(output),
                               **_logprob_fields(request, output, len(tokens)))


async def generate_stream(serving: OpenAIServing, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
    """Responses with the new text and tokens; input errors raise before the first one."""
    body = to_openai(request, stream=True)
    return _stream(request, body, await serving.choice_streams(_choices(serving, body)))


async def _stream(
    request: pb.GenerateRequest,
    body: CompletionRequest | ChatCompletionRequest,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[pb.GenerateResponse]:
    # A request with tools gets its answer whole in the last response, as text or as calls.
    whole = isinstance(body, ChatCompletionRequest) and calls_tools(body)
    async with aclosing(outputs):
        async for _, output in outputs:
            new_tokens = output.output.delta_token_ids
            if new_tokens or output.finished:
                fields = {"text": "" if whole else output.output.delta_text}
                if output.finished:
                    answer = _answer(body, output) if whole else {"finish_reason": output.output.finish_reason.value}
                    fields |= answer | _final_fields(output)
                yield pb.GenerateResponse(token_ids=new_tokens, **fields,
                                          **_logprob_fields(request, output, len(new_tokens)))
