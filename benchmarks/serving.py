"""Serving overhead: the Ray Serve application over HTTP and gRPC against the in-process engine.

Starts a local Ray with the application of ``configs/default.yaml`` (HTTP and gRPC on free
ports) and replays, in real time, the Azure conversation trace's arrivals at ``--rate`` with
Spec-Bench prompts and the trace's output lengths (as ``replay.py`` does) through three paths:
the OpenAI HTTP API (streaming, the official client), gRPC streaming, and the in-process engine
with the same engine config (loaded beside the application, idle while it serves). The paths
take turns for ``--rounds`` rounds, every other round in reverse order, so that the machine's
drift over the run falls on all of them alike. Client-side TTFT and TPOT (from the streamed
chunks) give SLO attainment and goodput per path; the serving overhead is the mean TPOT over a
network path against the in-process one (goal: at most 5% added per-token latency). The server's
own TPOT of the same requests tells what the network path itself adds.

    python benchmarks/serving.py --json OUT.json [--trace PATH] [--questions PATH] [--quick]
        [--rate R] [--requests N] [--rounds N] [--max-new-tokens N] [--torch-threads N]
        [--config configs/default.yaml]

``--torch-threads N`` runs both engines with N torch threads (default: the config's, else every
core), e.g. 1 on a 2-core machine to leave a core to the client and Ray's proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import openai
import torch
import yaml
from ray.serve.schema import ServeDeploySchema
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_report import DEFAULT_TRACE, chat_prompts  # noqa: E402
from replay import DEFAULT_QUESTIONS, Job, make_jobs, replay  # noqa: E402

from specserve.config import EngineConfig  # noqa: E402
from specserve.control.workload import Outcome, assign_slo_classes, read_trace, scale_trace, summarize  # noqa: E402
from specserve.deployments.config import AppConfig  # noqa: E402
from specserve.deployments.grpc import specserve_pb2 as pb  # noqa: E402
from specserve.deployments.grpc import specserve_pb2_grpc as pb_grpc  # noqa: E402
from specserve.deployments.launch import load_config  # noqa: E402
from specserve.engine.llm_engine import LLMEngine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIX = {"interactive": 0.4, "chat": 0.4, "batch": 0.2}


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timer:
    """Client-side token timing of one streamed request."""

    def __init__(self, job: Job, start: float) -> None:
        self.job, self.sent = job, start + job.arrival_s
        self.first: float | None = None
        self.last: float | None = None
        self.server_tpot_ms: float | None = None  # the server's own measure, from the last response

    def tokens_arrived(self) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now

    def outcome(self, tokens: int) -> Outcome:
        tpot = (self.last - self.first) / (tokens - 1) if tokens > 1 else None
        return Outcome(slo=self.job.slo, ttft_s=self.first - self.sent, tpot_s=tpot, output_tokens=tokens)


async def _at_arrivals(jobs: list[Job], send, bar: tqdm) -> tuple[list[Outcome], float]:
    start = time.monotonic()

    async def one(job: Job) -> Outcome:
        await asyncio.sleep(max(start + job.arrival_s - time.monotonic(), 0.0))
        outcome = await send(job, Timer(job, start))
        bar.update()
        return outcome

    outcomes = await asyncio.gather(*(one(job) for job in jobs))
    return list(outcomes), time.monotonic() - start


async def replay_http(
    jobs: list[Job], url: str, model: str, bar: tqdm, server_tpot: list
) -> tuple[list[Outcome], float]:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    async def send(job: Job, timer: Timer) -> Outcome:
        stream = await client.completions.create(
            model=model, prompt=job.prompt, max_tokens=job.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "slo_class": job.slo_class},
        )
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                timer.tokens_arrived()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            stats = (chunk.model_extra or {}).get("specserve")
            if stats:
                timer.server_tpot_ms = stats["tpot_ms"]
        server_tpot.append(timer.server_tpot_ms)
        return timer.outcome(tokens)

    try:
        return await _at_arrivals(jobs, send, bar)
    finally:
        await client.close()


async def replay_grpc(
    jobs: list[Job], target: str, prompts_text: dict, bar: tqdm, server_tpot: list
) -> tuple[list[Outcome], float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SpecServeStub(channel)

        async def send(job: Job, timer: Timer) -> Outcome:
            request = pb.GenerateRequest(
                prompt=prompts_text[tuple(job.prompt)], max_tokens=job.max_tokens, temperature=0,
                ignore_eos=True, slo_class=job.slo_class,
            )
            tokens = 0
            async for reply in stub.GenerateStream(request, metadata=(("application", "specserve"),)):
                if reply.token_ids:
                    timer.tokens_arrived()
                tokens += len(reply.token_ids)
                if reply.finish_reason:
                    server_tpot.append(reply.stats.tpot_ms if reply.stats.HasField("tpot_ms") else None)
            return timer.outcome(tokens)

        return await _at_arrivals(jobs, send, bar)


def load_app(
    config_path: Path, torch_threads: int | None, policy: str | None = None
) -> tuple[ServeDeploySchema, AppConfig]:
    """The Serve config file and its application's typed config, with ``torch_threads`` (if
    given) set for the replica and for this process's in-process engine, and the speculation
    ``policy`` (if given) for both."""
    serve_config = load_config(config_path)
    args = serve_config.applications[0].args
    if torch_threads is not None:
        args["torch_threads"] = torch_threads
        torch.set_num_threads(torch_threads)
    if policy is not None:
        args.setdefault("engine", {}).setdefault("control", {})["policy"] = policy
    return serve_config, AppConfig.model_validate(args)


def start_app(serve_config: ServeDeploySchema, http_port: int, grpc_port: int) -> None:
    import ray

    from specserve.deployments.launch import deploy

    config_path = Path(tempfile.mkdtemp()) / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config.model_dump(mode="json", exclude_unset=True)))
    ray.init(include_dashboard=False, log_to_driver=False)
    deploy(config_path, http_port=http_port, grpc_port=grpc_port, host="127.0.0.1")


def stop_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--quick", action="store_true", help="12 requests a round, 32 new tokens at most")
    parser.add_argument("--rate", type=float, default=0.15, help="requests/s")
    parser.add_argument("--requests", type=int, default=None, help="per path and round; default 40, 12 with --quick")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every path (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64, 32 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None, help="both engines' torch threads")
    args = parser.parse_args()
    for path in (args.trace, args.questions, args.config):
        if not path.is_file():
            parser.error(f"{path} not found")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    args.requests = args.requests or (12 if args.quick else 40)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 64)
    return args


def main() -> int:
    args = parse_args()
    serve_config, config = load_app(args.config, args.torch_threads)
    engine_config: EngineConfig = config.engine

    engine = LLMEngine(engine_config)
    max_prompt = engine.max_model_len - args.max_new_tokens
    prompts = chat_prompts(engine.apply_chat_template, args.questions, max_prompt, args.seed)
    slos = {name: engine_config.control.slo.resolve(name, None, None) for name in MIX}
    trace = read_trace(args.trace, args.requests)
    classes = assign_slo_classes(len(trace), MIX, args.seed)
    jobs = make_jobs(scale_trace(trace, args.rate, engine.max_model_len, args.max_new_tokens), prompts, classes, slos)
    # gRPC takes text: decoding and re-encoding a chat prompt gives back the same ids here.
    prompts_text = {tuple(p): engine.tokenizer.decode(p) for p in prompts}

    model_name = config.model_name or engine.model_path.name
    http_port, grpc_port = free_port(), free_port()
    start_app(serve_config, http_port, grpc_port)
    runs = {
        "in_process": lambda bar, server_tpot: replay(engine, jobs, "inproc", bar),
        "http": lambda bar, server_tpot: asyncio.run(
            replay_http(jobs, f"http://127.0.0.1:{http_port}/v1", model_name, bar, server_tpot)),
        "grpc": lambda bar, server_tpot: asyncio.run(
            replay_grpc(jobs, f"127.0.0.1:{grpc_port}", prompts_text, bar, server_tpot)),
    }
    outcomes: dict[str, list[Outcome]] = {path: [] for path in runs}
    durations = dict.fromkeys(runs, 0.0)
    server_tpots: dict[str, list] = {path: [] for path in runs}
    try:
        with tqdm(total=args.rounds * len(runs) * len(jobs), desc="requests") as bar:
            for round_ in range(args.rounds):
                for path in list(runs) if round_ % 2 == 0 else reversed(runs):
                    bar.set_postfix_str(f"round {round_ + 1}: {path}")
                    done, duration = runs[path](bar, server_tpots[path])
                    outcomes[path] += done
                    durations[path] += duration
    finally:
        stop_app()
        engine.shutdown()
    results = {path: {**summarize(outcomes[path], durations[path]), "duration_s": durations[path]}
               for path in runs}
    for path in ("http", "grpc"):
        results[path]["server_mean_tpot_ms"] = _mean(server_tpots[path])
        results[path]["network_added_tpot_ms"] = results[path]["mean_tpot_ms"] - _mean(server_tpots[path])

    base = results["in_process"]["mean_tpot_ms"]
    overhead = {path: results[path]["mean_tpot_ms"] / base - 1 for path in ("http", "grpc")}
    report = {
        "rate": args.rate,
        "requests_per_round": len(jobs),
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "paths": results,
        "tpot_overhead": overhead,
        "goal_tpot_overhead_at_most_5pct": all(v <= 0.05 for v in overhead.values()),
        "config": str(args.config),
        "torch_threads": args.torch_threads,
    }
    print("| path | SLO attainment | goodput tok/s | mean TTFT ms | mean TPOT ms (client) | "
          "mean TPOT ms (server) | p99 TPOT ms |")
    print("|---|---|---|---|---|---|---|")
    for path, r in results.items():
        server = r.get("server_mean_tpot_ms", r["mean_tpot_ms"])
        print(f"| {path} | {r['slo_attainment']:.1%} | {r['goodput_tok_s']:.1f} | {r['mean_ttft_ms']:.0f} | "
              f"{r['mean_tpot_ms']:.1f} | {server:.1f} | {r['p99_tpot_ms']:.1f} |")
    print(json.dumps({"tpot_overhead": overhead, "goal_met": report["goal_tpot_overhead_at_most_5pct"]}, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
