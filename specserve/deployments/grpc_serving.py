"""The gRPC API over the same serving logic as HTTP: protobuf in, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import ValidationError

from specserve.deployments.grpc import specserve_pb2 as pb
from specserve.deployments.openai_serving import Choice, OpenAIServing, bad_request, invalid_fields
from specserve.deployments.protocol import ChatCompletionRequest, CompletionRequest
from specserve.deployments.stats import request_stats
from specserve.engine.request import RequestOutput

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "slo_class", "tpot_slo_ms", "ttft_slo_ms",
             "presence_penalty", "frequency_penalty", "repetition_penalty")


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
    try:
        if request.messages:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            return ChatCompletionRequest(messages=messages, **fields)
        return CompletionRequest(prompt=request.prompt, **fields)
    except ValidationError as exc:
        raise invalid_fields(exc.errors()) from exc


def _choices(serving: OpenAIServing, request: pb.GenerateRequest, stream: bool) -> list[Choice]:
    """The request's one choice (the proto has one prompt and no ``n``)."""
    body = to_openai(request, stream)
    return serving.chat_choices(body) if isinstance(body, ChatCompletionRequest) else serving.completion_choices(body)


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
    return pb.GenerateResponse(text=output.output.text, token_ids=output.output.token_ids, **_final_fields(output))


async def generate_stream(serving: OpenAIServing, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
    """Responses with the new text and tokens; input errors raise before the first one."""
    return _stream(await serving.choice_streams(_choices(serving, request, stream=True)))


async def _stream(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[pb.GenerateResponse]:
    async with aclosing(outputs):
        async for _, output in outputs:
            if output.output.delta_token_ids or output.finished:
                extra = _final_fields(output) if output.finished else {}
                yield pb.GenerateResponse(
                    text=output.output.delta_text, token_ids=output.output.delta_token_ids, **extra
                )
