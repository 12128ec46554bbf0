"""Python client of SpecServe's gRPC API.

>>> with SpecServeClient("localhost:9000") as client:
...     reply = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32, slo_class="interactive")
...     print(reply.text, reply.stats.tpot_ms)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from specserve.deployments.grpc import specserve_pb2 as pb
from specserve.deployments.grpc import specserve_pb2_grpc as pb_grpc

DEFAULT_APPLICATION = "specserve"


class SpecServeClient:
    """Unary and streaming generation over one channel; raises ``grpc.RpcError`` on errors
    (INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when the server is overloaded)."""

    def __init__(self, target: str = "localhost:9000", application: str = DEFAULT_APPLICATION,
                 timeout_s: float | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.SpecServeStub(self._channel)
        self._metadata = (("application", application),)  # which Serve application answers
        self._timeout_s = timeout_s

    @staticmethod
    def request(
        prompt: str | None = None,
        messages: list[dict] | None = None,
        speculation: dict | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        **params,
    ) -> pb.GenerateRequest:
        """A GenerateRequest: a prompt or chat messages, plus sampling and SLO fields. Messages,
        ``tools`` and ``tool_choice`` take the OpenAI client's shapes (a named choice may also be
        just the function's name)."""
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice["function"]["name"]
        return pb.GenerateRequest(
            prompt=prompt or "",
            messages=[_message(m) for m in messages or []],
            speculation=pb.SpeculationBudget(**speculation) if speculation else None,
            tools=[_tool(t["function"]) for t in tools or []],
            tool_choice=tool_choice,
            **params,
        )

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 **params) -> pb.GenerateResponse:
        """The whole completion, with its finish reason, usage and stats."""
        return self._stub.Generate(
            self.request(prompt, messages, **params), metadata=self._metadata, timeout=self._timeout_s
        )

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None,
               **params) -> Iterator[pb.GenerateResponse]:
        """Responses with the new text as it is generated; the last also has usage and stats."""
        return self._stub.GenerateStream(
            self.request(prompt, messages, **params), metadata=self._metadata, timeout=self._timeout_s
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpecServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _message(message: dict) -> pb.ChatMessage:
    calls = [pb.ToolCall(id=call.get("id", ""), name=call["function"]["name"], arguments=call["function"]["arguments"])
             for call in message.get("tool_calls") or []]
    return pb.ChatMessage(role=message["role"], content=message.get("content") or "", tool_calls=calls,
                          tool_call_id=message.get("tool_call_id", ""), name=message.get("name", ""))


def _tool(function: dict) -> pb.Tool:
    parameters = json.dumps(function["parameters"]) if "parameters" in function else ""
    return pb.Tool(name=function["name"], description=function.get("description") or "", parameters=parameters)
