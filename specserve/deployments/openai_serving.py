"""The OpenAI API over an AsyncLLMEngine, independent of the web framework and of Ray.

Turns request bodies into engine prompts and sampling parameters, runs them, and shapes what
the engine reports into OpenAI responses or server-sent-event chunks. Bad input raises
``ServingError`` with the HTTP status and the OpenAI error type the front end should send.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from pydantic import ValidationError

from specserve.deployments.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    ChatMessage,
    ChatTool,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    MAX_CHOICES,
    GenerationFields,
    ModelCard,
    ModelList,
    PromptLogprobs,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Usage,
    new_id,
    unix_now,
)
from specserve.deployments.stats import choices_stats
from specserve.deployments.streams import interleave, prepend
from specserve.deployments.tools import ToolChoiceError, calls_tools, finish_reason, tool_calls, tool_constraint
from specserve.engine.async_engine import AsyncLLMEngine, RequestRejected
from specserve.engine.request import RequestOutput
from specserve.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.engine.structured import checked_grammar

RECOVERY_RETRY_AFTER_S = 15  # about how long Serve takes to replace a replica

# What an engine error message says -> the request field it is about (most specific first).
_FIELD_HINTS = {
    "max_completion_tokens": "max_completion_tokens",
    "max_tokens": "max_tokens",
    "logit_bias": "logit_bias",
    "SLO class": "slo_class",
    "stop": "stop",
    "chat template": "messages",
    "messages": "messages",
    "prompt": "prompt",
    "speculation": "speculation",
}


@dataclass
class ServingError(Exception):
    """An error the client caused (4xx), an overload it should retry (429/503), or a failed
    generation (500)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def bad_request(message: str, param: str | None = None) -> ServingError:
    if param is None:
        param = next((field for hint, field in _FIELD_HINTS.items() if hint in message), None)
    return ServingError(400, message, param=param)


def invalid_fields(errors: list[dict]) -> ServingError:
    """A 400 naming the first invalid field of a pydantic validation error list."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ServingError(400, "the request body is not valid JSON")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return ServingError(400, f"{param}: {message}" if param else message, param=param)


Prompt = str | list[int]
Choice = tuple[Prompt, SamplingParams]  # one engine request of an API request


def request_choices(prompts: list[Prompt], params: SamplingParams, n: int) -> list[Choice]:
    """``n`` choices per prompt, in OpenAI's order (prompt by prompt). A given seed becomes
    ``seed ^ i`` for a prompt's choice ``i`` (choice 0 keeps it), so that the choices differ and
    each can be had alone."""
    if params.seed is None:
        return [(prompt, params) for prompt in prompts for _ in range(n)]  # each draws its own seed
    return [(prompt, params.model_copy(update={"seed": params.seed ^ i})) for prompt in prompts for i in range(n)]


def most_likely(row: dict[int, float], count: int) -> list[tuple[int, float]]:
    """A logprobs row's ``count`` most likely (token, logprob) entries, most likely first."""
    return sorted(row.items(), key=lambda item: -item[1])[:count]


def _top(row: dict[int, float], token: int, count: int) -> dict[int, float]:
    """A logprobs row cut to its ``count`` most likely entries, plus ``token``'s own."""
    top = dict(most_likely(row, count))
    top.setdefault(token, row[token])
    return top


def structured_output(request: GenerationFields) -> StructuredOutput | None:
    """The constraint of ``response_format`` (OpenAI's) or ``structured_outputs`` (vLLM's), checked
    as a grammar; a 400 naming the field if it is invalid."""
    fmt, given = request.response_format, request.structured_outputs
    asked_format = fmt is not None and fmt.type != "text"
    if asked_format and given is not None:
        raise bad_request("give response_format or structured_outputs, not both", "structured_outputs")
    if not asked_format and given is None:
        return None
    field = "structured_outputs" if given is not None else "response_format"
    try:
        if given is not None:
            schema = json.loads(given.json_) if isinstance(given.json_, str) else given.json_
            spec = StructuredOutput(json_schema=schema, json_object=bool(given.json_object), regex=given.regex,
                                    choice=given.choice, grammar=given.grammar)
        elif fmt.type == "json_object":
            spec = StructuredOutput(json_object=True)
        else:
            spec = StructuredOutput(json_schema=fmt.json_schema.schema_)
        checked_grammar(spec)
    except ValidationError as exc:
        raise bad_request(f"{field}: {exc.errors()[0]['msg']}", field) from exc
    except ValueError as exc:
        raise bad_request(f"{field}: {str(exc).removeprefix('structured output: ')}", field) from exc
    return spec


async def error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, ending with an OpenAI error event if generation fails after the stream began
    (its HTTP status is already sent)."""
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except ServingError as exc:
            yield sse(exc.body())


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


class OpenAIServing:
    """Completions and chat completions for one served model."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        model_name: str,
        max_waiting_requests: int,
        on_done: Callable[[RequestOutput, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting_requests = max_waiting_requests
        self.on_done = on_done  # called with each request's last output and its outcome
        self.outcomes: Counter[str] = Counter()  # requests by outcome: a finish reason or "abort"
        self._mean_e2e_s = 1.0  # moving mean of finished requests' latency, for Retry-After

    # ------------------------------------------------------------------ checks

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    def _check_capacity(self) -> None:
        """Refuse new work (429 with Retry-After) while the queue is past its limit."""
        slots = self.engine.inputs.config.max_num_seqs
        waiting = self.engine.num_requests - slots
        if waiting >= self.max_waiting_requests:
            wait = self._mean_e2e_s * (1 + waiting / slots)
            raise ServingError(
                429,
                f"the server is overloaded ({waiting} requests waiting); retry later",
                type="rate_limit_error",
                retry_after_s=max(1, math.ceil(wait)),
            )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ServingError(
                404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                type="not_found_error", param="model",
            )

    def _params(
        self,
        request: GenerationFields,
        max_tokens: int,
        logprobs: int | None,
        echo_logprobs: int | None = None,
        tool_output: StructuredOutput | None = None,
    ) -> SamplingParams:
        """``echo_logprobs``: the alternatives an echoed prompt's tokens need, beside what
        ``prompt_logprobs`` asks for (the engine computes the larger count); ``tool_output``:
        the constraint of the request's tool_choice."""
        structured = structured_output(request)
        if tool_output is not None and structured is not None:
            raise bad_request("tool calls and response_format / structured_outputs do not go together", "tool_choice")
        structured = structured or tool_output
        if request.prompt_logprobs is not None and request.stream:
            raise bad_request("prompt_logprobs is not available when streaming (completions: use echo)",
                              "prompt_logprobs")
        counts = [c for c in (echo_logprobs, request.prompt_logprobs) if c is not None]
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids or [],
                logit_bias=request.logit_bias or {},
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty,
                ignore_eos=request.ignore_eos,
                structured=structured,
                logprobs=logprobs,
                prompt_logprobs=max(counts) if counts else None,
                speculation=request.speculation,
                slo_class=request.slo_class,
                tpot_slo_ms=request.tpot_slo_ms,
                ttft_slo_ms=request.ttft_slo_ms,
                output_kind="cumulative" if request.stream else "final_only",
            )
        except ValidationError as exc:
            raise invalid_fields(exc.errors()) from exc

    def _room(self, prompt_ids: list[int]) -> int:
        room = self.engine.inputs.max_model_len - len(prompt_ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self.engine.inputs.max_model_len}", "messages",
            )
        return room

    # -------------------------------------------------------------- generation

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Run one request; a ValueError of the engine becomes a 400 before anything is yielded,
        a request the engine rejects (its TTFT SLO is out of reach) a 503 with Retry-After, a
        failed generation a 500, and a stopped engine a 503 (the replica is being replaced); a
        full queue refuses it with a 429 before it reaches the engine.

        Closing the iterator early (a client that went away) aborts the request.
        """
        # The check and the engine's count of the request happen with no await between them, so
        # that a burst of concurrent requests cannot all pass the check before any is counted.
        self._check_capacity()
        stream = self.engine.generate(prompt, params, request_id=new_id("req"))
        async with aclosing(stream):
            try:
                output = await anext(stream)
            except ValueError as exc:
                raise bad_request(str(exc)) from exc
            except RequestRejected as exc:
                self._done(exc.output, "rejected")
                raise ServingError(503, str(exc), type="server_error",
                                   retry_after_s=max(1, math.ceil(self._mean_e2e_s))) from exc
            except RuntimeError as exc:
                raise self._server_error(exc) from exc
            outcome = "abort"  # unless it finishes or fails
            try:
                yield output
                async for output in stream:
                    yield output
                outcome = output.output.finish_reason.value
            except RuntimeError as exc:
                outcome = "error"
                raise self._server_error(exc) from exc
            finally:
                self._done(output, outcome)

    def _server_error(self, exc: RuntimeError) -> ServingError:
        if not self.engine.is_alive():
            return ServingError(503, f"this replica's engine has stopped ({exc}); retry",
                                type="server_error", retry_after_s=RECOVERY_RETRY_AFTER_S)
        return ServingError(500, f"generation failed: {exc}", type="server_error")

    def _done(self, output: RequestOutput, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if output.finished:
            e2e = output.metrics.finished_time - output.metrics.arrival_time
            self._mean_e2e_s = 0.9 * self._mean_e2e_s + 0.1 * e2e
        if self.on_done is not None:
            self.on_done(output, outcome)

    async def choice_streams(self, choices: list[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Start one request per choice; input errors raise here, before any output (so that they
        can still be a 400). Then (choice index, output) of every choice as they come."""
        streams = [self.generate(prompt, params) for prompt, params in choices]

        async def first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            return await anext(stream)

        try:
            async with asyncio.TaskGroup() as group:
                firsts = [group.create_task(first(stream)) for stream in streams]
        except BaseExceptionGroup as failed:
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
            raise failed.exceptions[0] from None
        return interleave([prepend(task.result(), stream) for task, stream in zip(firsts, streams)])

    async def choice_outputs(self, choices: list[Choice]) -> list[RequestOutput]:
        """Every choice's final output, in choice order."""
        finals: dict[int, RequestOutput] = {}
        async for index, output in await self.choice_streams(choices):
            finals[index] = output
        return [finals[index] for index in range(len(choices))]

    @staticmethod
    def _usage(outputs: dict[int, RequestOutput], n: int) -> Usage:
        """Each prompt once (its ``n`` choices share it) and every choice's completion."""
        prompt = sum(len(output.prompt_token_ids) for index, output in outputs.items() if index % n == 0)
        completion = sum(len(output.output.token_ids) for output in outputs.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -------------------------------------------------------------- tokenizer

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        inputs = self.engine.inputs
        if request.messages is not None:
            tokens = self._chat_prompt(request.messages)
        else:
            try:
                tokens = inputs.encode(request.prompt, add_special_tokens=request.add_special_tokens)
            except ValueError as exc:
                raise bad_request(str(exc), "prompt") from exc
        return TokenizeResponse(count=len(tokens), max_model_len=inputs.max_model_len, tokens=tokens)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        vocab = self.engine.inputs.vocab_size
        if bad := [t for t in request.tokens if not 0 <= t < vocab]:
            raise bad_request(f"tokens {bad[:5]} are outside [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=self.engine.inputs.tokenizer.decode(request.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        tokenizer = self.engine.inputs.tokenizer
        return TokenizerInfo(
            tokenizer_class=type(tokenizer).__name__,
            eos_token=tokenizer.eos_token,
            bos_token=tokenizer.bos_token,
            pad_token=tokenizer.pad_token,
            chat_template=tokenizer.chat_template,
            model_max_length=self.engine.inputs.max_model_len,
        )

    # ------------------------------------------------------------- completions

    def completion_choices(self, request: CompletionRequest) -> list[Choice]:
        self._check_model(request.model)
        prompts = request.prompts()
        if len(prompts) * request.n > MAX_CHOICES:
            raise bad_request(f"at most {MAX_CHOICES} choices a request: {len(prompts)} prompts x n={request.n}", "n")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        echo_logprobs = request.logprobs if request.echo else None
        params = self._params(request, max_tokens, request.logprobs, echo_logprobs)
        return request_choices(prompts, params, request.n)

    async def completion(self, request: CompletionRequest) -> CompletionResponse:
        requested = self.completion_choices(request)
        outputs = await self.choice_outputs(requested)
        return CompletionResponse(
            model=self.model_name,
            choices=[CompletionChoice(
                index=index,
                text=(self._echo(prompt, output) if request.echo else "") + output.output.text,
                finish_reason=output.output.finish_reason.value,
                logprobs=(self._completion_logprobs(output, 0, request.logprobs if request.echo else None)
                          if request.logprobs is not None else None),
                prompt_logprobs=self._prompt_logprobs(output, request.prompt_logprobs),
            ) for index, ((prompt, _), output) in enumerate(zip(requested, outputs))],
            usage=self._usage(dict(enumerate(outputs)), request.n),
            specserve=choices_stats(outputs),
        )

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[str]:
        """SSE lines; input errors raise before the first line, so they can still be a 400."""
        requested = self.completion_choices(request)
        outputs = await self.choice_streams(requested)
        return error_events(self._completion_events(request, requested, outputs))

    async def _completion_events(
        self, request: CompletionRequest, requested: list[Choice], outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[str]:
        """With echo, a choice's first chunk starts with its prompt."""
        response_id, created = new_id("cmpl"), unix_now()
        count = len(requested)
        sent: list[int | None] = [None] * count  # output tokens sent per choice; None: nothing yet
        finals: dict[int, RequestOutput] = {}
        async with aclosing(outputs):
            async for index, output in outputs:
                echo = request.echo and sent[index] is None
                start = sent[index] or 0
                choice = {
                    "index": index,
                    "text": (self._echo(requested[index][0], output) if echo else "") + output.output.delta_text,
                    "finish_reason": output.output.finish_reason.value if output.finished else None,
                    "logprobs": (
                        self._completion_logprobs(output, start, request.logprobs if echo else None)
                        if request.logprobs is not None else None
                    ),
                }
                sent[index] = len(output.output.token_ids)
                chunk = {"id": response_id, "object": "text_completion", "created": created,
                         "model": self.model_name, "choices": [choice]}
                if output.finished:
                    finals[index] = output
                    if len(finals) == count:  # the last choice to finish carries the request's stats
                        chunk["specserve"] = choices_stats(list(finals.values())).model_dump()
                if choice["text"] or output.finished or choice["logprobs"]:
                    yield sse(chunk)
        if request.stream_options is not None and request.stream_options.include_usage:
            yield sse({"id": response_id, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": [], "usage": self._usage(finals, request.n).model_dump()})
        yield sse("[DONE]")

    def _echo(self, prompt: Prompt, output: RequestOutput) -> str:
        """The prompt's text as echo returns it: as given, or decoded from its token ids."""
        return prompt if isinstance(prompt, str) else self.engine.inputs.tokenizer.decode(output.prompt_token_ids)

    def _completion_logprobs(self, output: RequestOutput, start: int, prompt_alternatives: int | None = None) -> dict:
        """The logprobs of the output tokens from ``start``, after the prompt's (with this many
        alternatives; its first token has none) if ``prompt_alternatives`` is not None (echo)."""
        tokenizer = self.engine.inputs.tokenizer
        ids = output.output.token_ids[start:]
        rows: list[dict[int, float] | None] = (output.output.logprobs or [])[start:]
        if prompt_alternatives is not None:
            prompt_rows = [None if row is None else _top(row, token, prompt_alternatives)
                           for token, row in zip(output.prompt_token_ids, output.prompt_logprobs)]
            ids, rows = output.prompt_token_ids + ids, prompt_rows + rows
        return {
            "tokens": [tokenizer.decode([t]) for t in ids],
            "token_logprobs": [None if row is None else row[t] for t, row in zip(ids, rows)],
            "top_logprobs": [
                None if row is None else {tokenizer.decode([k]): v for k, v in row.items()} for row in rows
            ],
        }

    def _prompt_logprobs(self, output: RequestOutput, count: int | None) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs: per prompt token (None for the first), its own and the ``count``
        most likely token ids with their log-probability and text."""
        if count is None:
            return None
        decode = self.engine.inputs.tokenizer.decode
        return [None if row is None else {
            str(k): {"logprob": v, "decoded_token": decode([k])} for k, v in _top(row, token, count).items()
        } for token, row in zip(output.prompt_token_ids, output.prompt_logprobs)]

    # -------------------------------------------------------- chat completions

    def _chat_prompt(self, messages: list[ChatMessage], tools: list[ChatTool] | None = None) -> list[int]:
        """The prompt token ids of a conversation (the chat template's layout, with the tools
        if it shows them)."""
        try:
            return self.engine.inputs.apply_chat_template(
                [m.template_fields() for m in messages],
                [tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            )
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from exc

    def chat_choices(self, request: ChatCompletionRequest) -> list[Choice]:
        self._check_model(request.model)
        try:
            tool_output = tool_constraint(request)
        except ToolChoiceError as exc:
            raise bad_request(str(exc), "tool_choice") from exc
        if tool_output is not None:
            try:
                checked_grammar(tool_output)
            except ValueError as exc:  # a function's parameters are no usable JSON schema
                raise bad_request(f"tools: {str(exc).removeprefix('structured output: ')}", "tools") from exc
        prompt_ids = self._chat_prompt(request.messages, request.tools)
        room = self._room(prompt_ids)
        max_tokens = request.max_completion_tokens or request.max_tokens or room
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self._params(request, max_tokens, logprobs, tool_output=tool_output)
        return request_choices([prompt_ids], params, request.n)

    @staticmethod
    def chat_message(request: ChatCompletionRequest, output: RequestOutput) -> tuple[ChatMessageOut, str]:
        """A finished choice's message (text, or the tool calls it makes) and finish reason."""
        calls = tool_calls(request, output)
        message = ChatMessageOut(content=None if calls else output.output.text, tool_calls=calls)
        return message, finish_reason(request, output, calls)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        outputs = await self.choice_outputs(self.chat_choices(request))
        choices = []
        for index, output in enumerate(outputs):
            message, reason = self.chat_message(request, output)
            logprobs = self._chat_logprobs(output, 0, request) if request.logprobs else None
            choices.append(ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs))
        return ChatCompletionResponse(
            model=self.model_name,
            choices=choices,
            usage=self._usage(dict(enumerate(outputs)), request.n),
            prompt_logprobs=self._prompt_logprobs(outputs[0], request.prompt_logprobs),  # one prompt
            specserve=choices_stats(outputs),
        )

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """SSE lines; input errors raise before the first line, so they can still be a 400."""
        outputs = await self.choice_streams(self.chat_choices(request))
        return error_events(self._chat_events(request, outputs))

    async def _chat_events(
        self, request: ChatCompletionRequest, outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[str]:
        response_id, created = new_id("chatcmpl"), unix_now()

        def chunk(choices: list[ChatChunkChoice], **extra) -> str:
            body = ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                       choices=choices, **extra)
            return sse(body.model_dump_json(exclude_none=True))

        yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                     for index in range(request.n)])
        sent = [0] * request.n
        finals: dict[int, RequestOutput] = {}
        tools = calls_tools(request)  # tool calls go out whole, in the choice's last chunk
        async with aclosing(outputs):
            async for index, output in outputs:
                delta, reason = DeltaMessage(content=output.output.delta_text), None
                logprobs = self._chat_logprobs(output, sent[index], request) if request.logprobs else None
                sent[index] = len(output.output.token_ids)
                if output.finished:
                    finals[index] = output
                    reason = output.output.finish_reason.value
                    if tools:
                        message, reason = self.chat_message(request, output)
                        delta = DeltaMessage(content=message.content, tool_calls=[
                            {"index": i, **call.model_dump()} for i, call in enumerate(message.tool_calls or [])
                        ] or None)
                elif tools:
                    delta = DeltaMessage()
                if delta.content or delta.tool_calls or output.finished or logprobs:
                    last = len(finals) == request.n and output.finished  # carries the request's stats
                    yield chunk(
                        [ChatChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)],
                        specserve=choices_stats(list(finals.values())) if last else None,
                    )
        if request.stream_options is not None and request.stream_options.include_usage:
            yield chunk([], usage=self._usage(finals, request.n))
        yield sse("[DONE]")

    def _chat_logprobs(self, output: RequestOutput, start: int, request: ChatCompletionRequest) -> dict:
        tokenizer = self.engine.inputs.tokenizer
        count = request.top_logprobs or 0
        content = []
        for token, row in zip(output.output.token_ids[start:], (output.output.logprobs or [])[start:]):
            text = tokenizer.decode([token])
            top = most_likely(row, count)
            content.append({
                "token": text,
                "logprob": row[token],
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": tokenizer.decode([k]), "logprob": v, "bytes": list(tokenizer.decode([k]).encode())}
                    for k, v in top
                ],
            })
        return {"content": content}

