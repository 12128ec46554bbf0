"""Tool calls in chat completions, made by structured output rather than parsed from free text.

A named ``tool_choice`` constrains the answer to that function's parameter schema, and
``"required"`` to a JSON list of ``{"name", "parameters"}`` objects of the given functions (as
vLLM does); either way the answer becomes the message's ``tool_calls``. ``"none"`` answers in
text. ``"auto"`` would need a parser for the model's own tool-call format, which SpecServe does
not have, so it is refused with a message saying what to send instead.
"""

from __future__ import annotations

import json

from specserve.deployments.protocol import ChatCompletionRequest, FunctionCall, ToolCall
from specserve.engine.request import FinishReason, RequestOutput
from specserve.engine.sampling_params import StructuredOutput


class ToolChoiceError(ValueError):
    """A tools / tool_choice combination SpecServe cannot serve (a 400 naming tool_choice)."""


def tool_constraint(request: ChatCompletionRequest) -> StructuredOutput | None:
    """The constraint a request's tool_choice puts on the answer (None: a text answer)."""
    choice, tools = request.tool_choice, request.tools or []
    if not tools:
        if choice not in (None, "none"):
            raise ToolChoiceError("tool_choice needs tools")
        return None
    if choice in (None, "auto"):
        raise ToolChoiceError("tool_choice 'auto' needs a parser of the model's tool-call format, which this "
                              "server has not: send 'required', 'none' or a named function")
    if choice == "none":
        return None
    functions = {tool.function.name: tool.function for tool in tools}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": f.parameters},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, f in functions.items()]
        return StructuredOutput(json_schema={"type": "array", "minItems": 1, "items": {"anyOf": calls}})
    if choice.function.name not in functions:
        raise ToolChoiceError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    return StructuredOutput(json_schema=functions[choice.function.name].parameters)


def tool_calls(request: ChatCompletionRequest, output: RequestOutput) -> list[ToolCall] | None:
    """The tool calls a finished answer makes; None for a text answer, or for one the token
    limit cut short (its text is then the message's content)."""
    if not calls_tools(request) or output.output.finish_reason is not FinishReason.STOP:
        return None
    text = output.output.text
    try:
        parsed = json.loads(text)  # a stop string may have cut it
    except ValueError:
        return None
    if request.tool_choice == "required":
        return [ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["parameters"])))
                for call in parsed]
    return [ToolCall(function=FunctionCall(name=request.tool_choice.function.name, arguments=text))]


def calls_tools(request: ChatCompletionRequest) -> bool:
    """Whether the answer is to be tool calls rather than text."""
    return bool(request.tools) and request.tool_choice not in (None, "none", "auto")


def finish_reason(request: ChatCompletionRequest, output: RequestOutput, calls: list[ToolCall] | None) -> str:
    """OpenAI's: "tool_calls" when the model chose to call (``required``), "stop" when the request
    named the function, else the engine's reason."""
    if calls is not None and request.tool_choice == "required":
        return "tool_calls"
    return output.output.finish_reason.value
