"""Where the serving path's per-token cost goes: one closed workload, in-process and on Serve.

Runs the same chat requests (Spec-Bench questions, greedy, a fixed number of new tokens, a fixed
number at a time) on an in-process ``AsyncLLMEngine`` and through the OpenAI HTTP API of the
application of ``configs/default.yaml``, after a warm-up round on each. Both engines make the same
decisions, so their time in drafting and verifying (the replica reports it in ``stats``) tells
whether the engine itself runs slower in the replica, and the client's TPOT how much the whole
path adds.

    python benchmarks/serving_closed.py --json OUT.json [--requests N] [--concurrency C]
        [--max-new-tokens N] [--torch-threads N] [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import DEFAULT_QUESTIONS  # noqa: E402
from serving import free_port, load_app, start_app, stop_app  # noqa: E402

from specserve.engine.async_engine import AsyncLLMEngine  # noqa: E402
from specserve.engine.sampling_params import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Send = Callable[[list[dict]], Awaitable[list[float]]]  # one request -> its token arrival times


async def closed_loop(conversations: list[list[dict]], concurrency: int, send: Send, tokens: int) -> list[float]:
    """Every conversation, ``concurrency`` at a time; each request's TPOT in ms."""
    tpots = []
    for start in range(0, len(conversations), concurrency):
        batch = conversations[start : start + concurrency]
        for times in await asyncio.gather(*(send(messages) for messages in batch)):
            tpots.append((times[-1] - times[0]) / (tokens - 1) * 1e3)
    return tpots


def measure(run: Callable[[], list[float]], engine_seconds: Callable[[], dict]) -> dict:
    """Warm up, then run once more and report the client's TPOT and the engine's time."""
    run()
    before = engine_seconds()
    start = time.perf_counter()
    tpots = run()
    wall = time.perf_counter() - start
    after = engine_seconds()
    spent = {key: after[key] - before[key] for key in ("steps", "accepted", "draft_time_s", "verify_time_s")}
    return {"mean_tpot_ms": sum(tpots) / len(tpots), "wall_s": wall, **spent,
            "engine_s": spent["draft_time_s"] + spent["verify_time_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=None, help="both engines' torch threads")
    args = parser.parse_args()
    for path in (args.config, args.questions):
        if not path.is_file():
            parser.error(f"{path} not found")
    if min(args.requests, args.concurrency) < 1 or args.max_new_tokens < 2:
        parser.error("--requests and --concurrency must be at least 1, --max-new-tokens at least 2")

    serve_config, config = load_app(args.config, args.torch_threads)
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": q["turns"][0][:600]}] for q in questions[: args.requests]]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    results = {}

    engine = AsyncLLMEngine(config.engine)

    async def send_local(messages: list[dict]) -> list[float]:
        times = []
        async for _ in engine.generate(engine.engine.apply_chat_template(messages), params):
            times.append(time.monotonic())
        return times

    results["in_process"] = measure(
        lambda: asyncio.run(closed_loop(conversations, args.concurrency, send_local, args.max_new_tokens)),
        engine.engine.spec_stats.to_dict)
    model_name = config.model_name or engine.engine.model_path.name
    engine.shutdown()

    from ray import serve

    http_port = free_port()
    start_app(serve_config, http_port, free_port())
    try:
        replica = serve.get_app_handle(serve_config.applications[0].name)

        async def http_round() -> list[float]:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)

            async def send(messages: list[dict]) -> list[float]:
                times = []
                stream = await client.chat.completions.create(
                    model=model_name, messages=messages, max_tokens=args.max_new_tokens, temperature=0,
                    stream=True, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        times.append(time.monotonic())
                return times

            try:
                return await closed_loop(conversations, args.concurrency, send, args.max_new_tokens)
            finally:
                await client.close()

        results["http"] = measure(lambda: asyncio.run(http_round()),
                                  lambda: replica.stats.remote().result()["speculation"])
    finally:
        stop_app()

    local, remote = results["in_process"], results["http"]
    report = {**vars(args), "json": str(args.json), "config": str(args.config), "questions": str(args.questions),
              "paths": results, "tpot_ratio": remote["mean_tpot_ms"] / local["mean_tpot_ms"],
              "engine_time_ratio": remote["engine_s"] / local["engine_s"]}
    print("| path | steps | accepted | draft s | verify s | mean TPOT ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, r in results.items():
        print(f"| {path} | {r['steps']} | {r['accepted']} | {r['draft_time_s']:.2f} | {r['verify_time_s']:.2f} | "
              f"{r['mean_tpot_ms']:.1f} |")
    print(f"replica / in-process: TPOT {report['tpot_ratio']:.2f}x, engine time {report['engine_time_ratio']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
