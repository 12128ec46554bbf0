"""The gRPC API over the same serving logic as HTTP: protobuf in, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import ValidationError

from specserve.deployments.grpc import specserve_pb2 as pb
from specserve.deployments.openai_serving import Choice, OpenAIServing, bad_request, invalid_fields, most_likely
from specserve.deployments.protocol import ChatCompletionRequest, CompletionRequest
from specserve.deployments.stats import request_stats
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
    try:
        if request.messages:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if logprobs is not None:
                fields |= {"logprobs": True, "top_logprobs": logprobs}
            return ChatCompletionRequest(messages=messages, **fields)
        return CompletionRequest(prompt=request.prompt, logprobs=logprobs, **fields)
    except ValidationError as exc:
        raise invalid_fields(exc.errors()) from exc


def _choices(serving: OpenAIServing, request: pb.GenerateRequest, stream: bool) -> list[Choice]:
    """The request's one choice (the proto has one prompt and no ``n``)."""
    body = to_openai(request, stream)
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


def _final_fields(output: RequestOutput) -> dict:
    stats = request_stats(output)
    spec = stats.speculation
    return {
        "finish_reason": output.output.finish_reason.value,
        "usage": pb.Usage(prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(output.output.token_ids)),
        "stats": pb.RequestStats(
            **{k: v for k, v in stats.model_dump(exclude={"speculation"}).items() if v is not None},
            speculation_steps=spec.steps if spec else 0,
            accepted_tokens=spec.accepted if spec else 0,
            mean_accepted_tokens=spec.mean_accepted_tokens if spec else 0.0,
        ),
    }


async def generate(serving: OpenAIServing, request: pb.GenerateRequest) -> pb.GenerateResponse:
    (output,) = await serving.choice_outputs(_choices(serving, request, stream=False))
    tokens = output.output.token_ids
    return pb.GenerateResponse(text=output.output.text, token_ids=tokens, **_final_fields(output),
                               **_logprob_fields(request, output, len(tokens)))


async def generate_stream(serving: OpenAIServing, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
    """Responses with the new text and tokens; input errors raise before the first one."""
    return _stream(request, await serving.choice_streams(_choices(serving, request, stream=True)))


async def _stream(
    request: pb.GenerateRequest, outputs: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[pb.GenerateResponse]:
    async with aclosing(outputs):
        async for _, output in outputs:
            new_tokens = output.output.delta_token_ids
            if new_tokens or output.finished:
                extra = _final_fields(output) if output.finished else {}
                yield pb.GenerateResponse(text=output.output.delta_text, token_ids=new_tokens, **extra,
                                          **_logprob_fields(request, output, len(new_tokens)))
