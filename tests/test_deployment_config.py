"""Serve config files, the application config, the SLO autoscaling policy, and error mapping (no cluster)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from specserve.deployments.autoscaling import KV_USAGE, ON_TRACK, WAITING, SLOAutoscalingPolicy  # noqa: E402
from specserve.deployments.config import AppConfig  # noqa: E402
from specserve.deployments.launch import APPLIED_FIELDS, deploy  # noqa: E402
from specserve.config import ControlConfig, EngineConfig, SLOConfig  # noqa: E402
from specserve.deployments.metrics import ServingMetrics  # noqa: E402
from specserve.deployments.openai_serving import OpenAIServing, ServingError, error_events  # noqa: E402
from specserve.deployments.protocol import CompletionRequest  # noqa: E402
from specserve.engine.async_engine import AsyncLLMEngine  # noqa: E402
from specserve.deployments.streams import interleave  # noqa: E402

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_are_valid(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        assert app.import_path == "specserve.deployments.app:build_app"
        assert app.model_fields_set <= APPLIED_FIELDS  # deploy() (the benchmarks, the cluster script) applies all
        AppConfig.model_validate(app.args)  # raises on any unknown or invalid field


def test_deploy_refuses_what_it_would_not_apply(tmp_path):
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["applications"][0]["runtime_env"] = {"env_vars": {"X": "1"}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="sets runtime_env, which only `serve run"):
        deploy(path)


def test_configs_cover_default_autoscaling_and_gpu():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "autoscaling.yaml", "gpu-tp2.yaml"}


def test_app_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        AppConfig.model_validate({"bogus": 1})


def test_the_engine_runs_in_its_own_process_unless_told_otherwise():
    assert AppConfig().engine_process
    assert not AppConfig.model_validate({"engine_process": False}).engine_process


def test_an_engine_uses_ray_for_a_draft_actor_or_ray_tensor_parallel_ranks():
    assert not AppConfig().engine.uses_ray
    assert not AppConfig.model_validate({"engine": {"tensor_parallel_size": 2}}).engine.uses_ray
    actor_draft = {"speculative": {"method": "draft", "draft_placement": "actor"}}
    ray_tp = {"tensor_parallel_size": 2, "worker_backend": "ray"}
    assert all(AppConfig.model_validate({"engine": engine}).engine.uses_ray for engine in (actor_draft, ray_tp))


def test_autoscaling_settings_name_the_slo_policy():
    config = AppConfig.model_validate({"autoscaling": {"max_replicas": 3, "waiting_per_replica": 2}})
    serve_config = config.autoscaling.serve_config()
    assert serve_config["policy"]["policy_function"] == "specserve.deployments.autoscaling:SLOAutoscalingPolicy"
    assert serve_config["policy"]["policy_kwargs"]["waiting_per_replica"] == 2
    assert serve_config["max_replicas"] == 3


@pytest.mark.parametrize("current, waiting, kv, on_track, expected", [
    (1, 0, 0.5, 1.0, 1),    # busy enough, nobody waits: stay
    (1, 9, 1.0, 1.0, 2),    # 9 waiting at 4 per replica asks for 3; at most doubling
    (2, 9, 1.0, 1.0, 3),    # ... which 2 replicas may reach
    (2, 40, 1.0, 1.0, 4),   # at most doubling per decision
    (2, 0, 0.8, 0.5, 3),    # requests falling behind their SLO: one more
    (3, 0, 0.1, 1.0, 2),    # idle: one fewer
    (1, 0, 0.0, 1.0, 1),    # never below one
])
def test_policy_decisions(current, waiting, kv, on_track, expected):
    assert SLOAutoscalingPolicy().desired(current, waiting, kv, on_track) == expected


def test_policy_reads_replica_stats():
    policy = SLOAutoscalingPolicy(waiting_per_replica=2)
    ctx = SimpleNamespace(
        current_num_replicas=2, total_num_requests=10,
        aggregated_metrics={WAITING: {"a": 3.0, "b": 4.0}, KV_USAGE: {"a": 1.0, "b": 1.0},
                            ON_TRACK: {"a": 1.0, "b": 1.0}},
    )
    assert policy(ctx) == (4, {})
    cold = SimpleNamespace(current_num_replicas=0, total_num_requests=1, aggregated_metrics={})
    assert policy(cold) == (1, {})


def test_engine_failures_are_500_or_503_when_the_engine_stopped():
    failure = RuntimeError("step failed: Connection closed by peer")
    running = SimpleNamespace(engine=SimpleNamespace(is_alive=lambda: True))
    stopped = SimpleNamespace(engine=SimpleNamespace(is_alive=lambda: False))
    error = OpenAIServing._server_error(running, failure)
    assert (error.status, error.type, error.retry_after_s) == (500, "server_error", None)
    assert "step failed" in error.message
    error = OpenAIServing._server_error(stopped, failure)
    assert (error.status, error.type) == (503, "server_error") and error.retry_after_s > 0


def test_a_request_the_engine_rejects_is_a_503_with_retry_after_and_counted(tiny_model):
    """on_miss='reject' turns away a request whose TTFT SLO is already past; the metrics record
    it (a request with no output token must not break Ray's counters)."""
    engine = AsyncLLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=2, max_model_len=256,
        control=ControlConfig(slo=SLOConfig(on_miss="reject")),
    ))
    metrics = ServingMetrics("rejects")
    serving = OpenAIServing(engine, "tiny", 8, on_done=metrics.request_done)

    async def ask(**fields):
        return await serving.completion(CompletionRequest(prompt="hello", **fields))

    try:
        with pytest.raises(ServingError) as rejected:
            asyncio.run(ask(max_tokens=2, ttft_slo_ms=1e-6))
        assert (rejected.value.status, rejected.value.type) == (503, "server_error")
        assert rejected.value.retry_after_s >= 1 and "TTFT SLO" in rejected.value.message
        scored = asyncio.run(ask(max_tokens=0, echo=True))  # ends without an output token
        assert scored.choices[0].text == "hello"
        assert serving.outcomes == {"rejected": 1, "length": 1}
    finally:
        engine.shutdown()


def test_a_burst_is_admitted_up_to_the_queue_limit_and_the_rest_get_429(tiny_model):
    """One KV slot and room for one waiting request: of five concurrent requests two run and three
    are refused, however their admission checks interleave with the engine's count (a request
    with a grammar is counted before the grammar is compiled off the event loop)."""
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=1, max_model_len=256))
    serving = OpenAIServing(engine, "tiny", 1)

    async def burst():
        request = CompletionRequest(prompt="hello", max_tokens=4, temperature=0,
                                    response_format={"type": "json_object"})
        return await asyncio.gather(*(serving.completion(request) for _ in range(5)), return_exceptions=True)

    try:
        results = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, ServingError)]
        assert len(refused) == 3 and all(r.status == 429 and r.retry_after_s >= 1 for r in refused)
        assert sum(r.choices[0].finish_reason in ("stop", "length") for r in results if r not in refused) == 2
        assert engine.num_requests == 0
    finally:
        engine.shutdown()


def test_a_stream_that_fails_midway_ends_with_an_error_event():
    async def events():
        yield "data: 1\n\n"
        raise ServingError(500, "generation failed: boom", type="server_error")

    async def collect():
        return [event async for event in error_events(events())]

    first, last = asyncio.run(collect())
    assert first == "data: 1\n\n"
    assert json.loads(last.removeprefix("data: "))["error"] == {
        "message": "generation failed: boom", "type": "server_error", "param": None, "code": None}


def test_interleaved_choices_keep_each_order_fail_together_and_close_together():
    closed = []

    async def stream(name, items, fail=False):
        try:
            for item in items:
                await asyncio.sleep(0)
                yield item
            if fail:
                raise ServingError(500, "generation failed: boom", type="server_error")
        finally:
            closed.append(name)

    async def main():
        got = [pair async for pair in interleave([stream("a", [1, 2, 3]), stream("b", [4, 5])])]
        assert [v for i, v in got if i == 0] == [1, 2, 3] and [v for i, v in got if i == 1] == [4, 5]
        closed.clear()
        with pytest.raises(ServingError, match="boom"):
            _ = [pair async for pair in interleave([stream("a", range(1000)), stream("b", [1], fail=True)])]
        assert sorted(closed) == ["a", "b"]  # the failure closed its sibling
        closed.clear()
        merged = interleave([stream("a", range(1000)), stream("b", range(1000))])
        await anext(merged)
        await merged.aclose()  # a client that went away
        assert sorted(closed) == ["a", "b"]

    asyncio.run(main())
