"""The engine replica: a Ray Serve deployment that owns an engine and speaks HTTP and gRPC.

HTTP is a FastAPI app (OpenAI-compatible); gRPC methods are plain methods with the proto's
names, which Serve's gRPC proxy calls. Each replica reports its load for the SLO autoscaler
and exports Prometheus metrics.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' body types at run time.

import os
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import grpc
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from specserve.deployments import grpc_serving
from specserve.deployments.autoscaling import KV_USAGE, ON_TRACK, WAITING
from specserve.deployments.config import ServerConfig
from specserve.deployments.grpc import specserve_pb2 as pb
from specserve.deployments.metrics import ServingMetrics
from specserve.deployments.openai_serving import OpenAIServing, ServingError, invalid_fields
from specserve.deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.heap import freeze_startup_heap

api = FastAPI(title="SpecServe", description="OpenAI-compatible API with per-request SLOs")

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _error_response(exc: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(invalid_fields(list(exc.errors())))


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _grpc_error(context: RayServegRPCContext, exc: ServingError) -> None:
    context.set_code(_GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
    context.set_details(exc.message)


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
@serve.ingress(api)
class SpecServeServer:
    """One engine replica."""

    def __init__(self, config: ServerConfig | dict) -> None:
        self._stop = threading.Event()
        config = ServerConfig.model_validate(config)
        threads = config.torch_threads or _usable_cores()
        torch.set_num_threads(threads)
        self.engine = AsyncLLMEngine(config.engine, own_process=config.engine_process, torch_threads=threads)
        name = config.model_name or Path(self.engine.inputs.model_path).name
        self.metrics = ServingMetrics(name)
        self.serving = OpenAIServing(self.engine, name, config.max_waiting_requests, self.metrics.request_done)
        self._metrics_interval_s = config.metrics_interval_s
        threading.Thread(target=self._refresh_metrics, name="specserve-metrics", daemon=True).start()
        freeze_startup_heap()  # the replica's process serves: full collections skip what it made to start

    def _refresh_metrics(self) -> None:
        while not self._stop.wait(self._metrics_interval_s):
            self.metrics.refresh(self.engine.load(), self.engine.spec_stats())

    # ---------------------------------------------------------------- HTTP

    @api.get("/health")
    async def health(self) -> JSONResponse:
        if not self.engine.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self) -> dict:
        return self.serving.models().model_dump()

    @api.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict:
        return self.serving.tokenize(body).model_dump()

    @api.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict:
        return self.serving.detokenize(body).model_dump()

    @api.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict:
        return self.serving.tokenizer_info().model_dump()

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        if body.stream:
            return StreamingResponse(await self.serving.completion_stream(body), media_type="text/event-stream")
        return (await self.serving.completion(body)).model_dump(exclude_none=True)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        if body.stream:
            return StreamingResponse(await self.serving.chat_stream(body), media_type="text/event-stream")
        return (await self.serving.chat(body)).model_dump(exclude_none=True)

    # ---------------------------------------------------------------- gRPC

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:  # noqa: N802
        try:
            return await grpc_serving.generate(self.serving, request)
        except ServingError as exc:
            _grpc_error(grpc_context, exc)
            return pb.GenerateResponse()

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            responses = await grpc_serving.generate_stream(self.serving, request)
        except ServingError as exc:
            # A stream that yields nothing never passes its context on: raising with the code
            # set is how Serve's proxy still sends it.
            _grpc_error(grpc_context, exc)
            raise
        async for response in responses:
            yield response

    # ------------------------------------------------------- Serve's hooks

    def check_health(self) -> None:
        """Serve restarts a replica whose engine stopped."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop has stopped")

    def stats(self) -> dict:
        """This replica's load, its requests by outcome, and its speculation totals (for operators
        and tests)."""
        return {"load": asdict(self.engine.load()), "outcomes": dict(self.serving.outcomes),
                "speculation": self.engine.spec_stats().to_dict()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.engine.load()
        return {WAITING: float(load.waiting), KV_USAGE: load.kv_usage, ON_TRACK: load.on_track}

    def __del__(self) -> None:
        self._stop.set()
        if hasattr(self, "engine"):
            self.engine.shutdown()
