"""Where the serving path's per-token cost goes: one closed workload, in-process and on Serve.

Runs the same chat requests (Spec-Bench questions, greedy, a fixed number of new tokens, a fixed
number at a time) through five paths, which take turns for ``--rounds`` rounds after a warm-up
round each:

- ``in_process``: an ``AsyncLLMEngine`` of this process, its loop in a process of its own as the
  replica runs it (``own_process``), with every Ray process paused (SIGSTOP), so that the
  engine has the machine to itself, as it would without Serve;
- ``in_process_neighbour``: the same beside a process that keeps a tenth of one core busy in
  short bursts (Ray still paused): how much a little stolen CPU slows this engine;
- ``in_process_ray_idle``: the same engine with Ray's processes running but serving nothing (the
  Serve controller, proxy and idle replica, the raylet and GCS): what Ray's presence alone costs;
- ``http``: the OpenAI HTTP API (streaming) of the application of ``configs/default.yaml``;
- ``grpc``: its gRPC ``GenerateStream``.

For each path it reports the client's TPOT, the engine's time in drafting and verifying (the
replica reports it in ``stats``), and the CPU time that every process on the machine used per
generated token, in all and by process (this benchmark's, Serve's replica with its engine
process, proxy and controller, the rest), so the served paths' extra CPU per token can be set
against what stolen CPU costs the engine.

    python benchmarks/serving_closed.py --json OUT.json [--requests N] [--concurrency C]
        [--rounds N] [--max-new-tokens N] [--torch-threads N] [--policy P] [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import openai
import psutil
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import DEFAULT_QUESTIONS  # noqa: E402
from serving import free_port, load_app, start_app, stop_app  # noqa: E402

from specserve.control.policies import POLICIES  # noqa: E402
from specserve.deployments.grpc import specserve_pb2 as pb  # noqa: E402
from specserve.deployments.grpc import specserve_pb2_grpc as pb_grpc  # noqa: E402
from specserve.engine.async_engine import AsyncLLMEngine  # noqa: E402
from specserve.engine.sampling_params import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Send = Callable[[list[dict]], Awaitable[list[float]]]  # one request -> its token arrival times
SPEC_KEYS = ("steps", "accepted", "draft_time_s", "verify_time_s")
SERVE_ROLES = {"ray::ServeReplica": "replica", "ray::ProxyActor": "proxy", "ray::ServeController": "serve_controller"}
ROLES = ("benchmark", *SERVE_ROLES.values(), "other")


async def closed_loop(conversations: list[list[dict]], concurrency: int, send: Send, tokens: int) -> list[float]:
    """Every conversation, ``concurrency`` at a time; each request's TPOT in ms."""
    tpots = []
    for start in range(0, len(conversations), concurrency):
        batch = conversations[start : start + concurrency]
        for times in await asyncio.gather(*(send(messages) for messages in batch)):
            tpots.append((times[-1] - times[0]) / (tokens - 1) * 1e3)
    return tpots


def cpu_seconds_by_role(ours: set[int]) -> Counter[str]:
    """CPU seconds used so far by every running process of the machine, by its role: the
    benchmark's processes ``ours`` (the clients, and the in-process engine's), Serve's replica,
    proxy and controller, and the rest (Ray's daemons, the busy neighbour, anything else)."""
    usage: Counter[str] = Counter()
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            usage["benchmark" if process.pid in ours else _role(process)] += times.user + times.system
    return usage


def _role(process: psutil.Process) -> str:
    role = _title_role(process)
    if role == "other" and (parent := process.parent()) is not None and _title_role(parent) == "replica":
        return "replica"  # the replica's engine process
    return role


def _title_role(process: psutil.Process) -> str:
    title = " ".join(process.cmdline() or [])
    return next((role for prefix, role in SERVE_ROLES.items() if title.startswith(prefix)), "other")


def busy_neighbour(burst_s: float = 0.0005, pause_s: float = 0.0045) -> None:
    """Keep a tenth of one core busy in short bursts, as a proxy forwarding chunks would."""
    while True:
        end = time.perf_counter() + burst_s
        while time.perf_counter() < end:
            pass
        time.sleep(pause_s)


@contextlib.contextmanager
def paused(processes: list[psutil.Process]) -> Iterator[None]:
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            process.resume()


@contextlib.contextmanager
def resumed(process: psutil.Process) -> Iterator[None]:
    process.resume()
    try:
        yield
    finally:
        process.suspend()


def start_neighbour() -> psutil.Process:
    """The busy neighbour, started (before Ray, whose gRPC threads make forking unsafe) and paused."""
    process = multiprocessing.Process(target=busy_neighbour, daemon=True)
    process.start()
    neighbour = psutil.Process(process.pid)
    neighbour.suspend()
    return neighbour


def measure(run: Callable[[], list[float]], engine_stats: Callable[[], dict], tokens: int, ours: set[int]) -> dict:
    """One round of ``run``: the client's TPOT, the engine's time and the machine's CPU per
    token, in all and by process role."""
    before, cpu_before, start = engine_stats(), cpu_seconds_by_role(ours), time.perf_counter()
    tpots = run()
    wall, cpu = time.perf_counter() - start, cpu_seconds_by_role(ours)
    cpu.subtract(cpu_before)
    after = engine_stats()
    spent = {key: after[key] - before[key] for key in SPEC_KEYS}
    generated = len(tpots) * tokens
    by_role = {role: max(0.0, cpu[role]) / generated * 1e3 for role in ROLES}  # a process that ended counts 0
    return {"mean_tpot_ms": statistics.fmean(tpots), "wall_s": wall, **spent,
            "engine_s": spent["draft_time_s"] + spent["verify_time_s"],
            "cpu_ms_per_token": sum(by_role.values()), "cpu_ms_per_token_by_role": by_role}


def summarize(rounds: list[dict]) -> dict:
    by_role = {role: statistics.fmean(r["cpu_ms_per_token_by_role"][role] for r in rounds) for role in ROLES}
    scalars = {key: statistics.fmean(r[key] for r in rounds) for key, value in rounds[0].items()
               if isinstance(value, (int, float))}
    return scalars | {"cpu_ms_per_token_by_role": by_role, "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=None, help="both engines' torch threads")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=None,
                        help="both engines' speculation policy (default: the config's); 'none' makes "
                        "every path do the same work, which isolates the serving path's cost")
    args = parser.parse_args()
    for path in (args.config, args.questions):
        if not path.is_file():
            parser.error(f"{path} not found")
    if min(args.requests, args.concurrency, args.rounds) < 1 or args.max_new_tokens < 2:
        parser.error("--requests, --concurrency and --rounds must be at least 1, --max-new-tokens at least 2")

    serve_config, config = load_app(args.config, args.torch_threads, args.policy)
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": q["turns"][0][:600]}] for q in questions[: args.requests]]
    tokens = args.max_new_tokens
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    neighbour = start_neighbour()
    engine = AsyncLLMEngine(config.engine, own_process=True, torch_threads=args.torch_threads)
    model_name = config.model_name or engine.inputs.model_path.name

    async def send_local(messages: list[dict]) -> list[float]:
        times = []
        async for _ in engine.generate(engine.inputs.apply_chat_template(messages), params):
            times.append(time.monotonic())
        return times

    async def send_http(client: openai.AsyncOpenAI, messages: list[dict]) -> list[float]:
        times = []
        stream = await client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
        return times

    async def send_grpc(stub: pb_grpc.SpecServeStub, messages: list[dict]) -> list[float]:
        times = []
        request = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in messages], max_tokens=tokens,
                                     temperature=0, ignore_eos=True)
        async for reply in stub.GenerateStream(request, metadata=(("application", "specserve"),)):
            if reply.token_ids:
                times.append(time.monotonic())
        return times

    async def http_round(port: int) -> list[float]:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
            return await closed_loop(conversations, args.concurrency, lambda m: send_http(client, m), tokens)

    async def grpc_round(port: int) -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpecServeStub(channel)
            return await closed_loop(conversations, args.concurrency, lambda m: send_grpc(stub, m), tokens)

    def local_round() -> list[float]:
        return asyncio.run(closed_loop(conversations, args.concurrency, send_local, tokens))

    from ray import serve

    http_port, grpc_port = free_port(), free_port()
    start_app(serve_config, http_port, grpc_port)
    try:
        replica = serve.get_app_handle(serve_config.applications[0].name)
        benchmark_pids = {os.getpid(), engine.pid}  # their CPU is the in-process paths' (clients and engine)
        ray_processes = [p for p in psutil.Process().children(recursive=True)
                         if p.pid not in benchmark_pids | {neighbour.pid}]

        def replica_stats() -> dict:
            return replica.stats.remote().result()["speculation"]

        def local_alone() -> list[float]:
            with paused(ray_processes):
                return local_round()

        def local_beside_neighbour() -> list[float]:
            with paused(ray_processes), resumed(neighbour):
                return local_round()

        paths: dict[str, tuple[Callable[[], list[float]], Callable[[], dict]]] = {
            "in_process": (local_alone, lambda: engine.spec_stats().to_dict()),
            "in_process_neighbour": (local_beside_neighbour, lambda: engine.spec_stats().to_dict()),
            "in_process_ray_idle": (local_round, lambda: engine.spec_stats().to_dict()),
            "http": (lambda: asyncio.run(http_round(http_port)), replica_stats),
            "grpc": (lambda: asyncio.run(grpc_round(grpc_port)), replica_stats),
        }
        for run, _ in paths.values():
            run()  # warm-up
        rounds: dict[str, list[dict]] = {path: [] for path in paths}
        with tqdm(total=args.rounds * len(paths), desc="rounds") as bar:
            for _ in range(args.rounds):
                for path, (run, stats) in paths.items():
                    rounds[path].append(measure(run, stats, tokens, benchmark_pids))
                    bar.update()
    finally:
        stop_app()
        engine.shutdown()
        neighbour.kill()

    results = {path: summarize(r) for path, r in rounds.items()}
    alone = results["in_process"]
    # Rounds take turns, so a round's ratio to the in-process round beside it is the steadier
    # measure on a machine whose speed drifts between rounds.
    ratios = {path: {"tpot": r["mean_tpot_ms"] / alone["mean_tpot_ms"],
                     "tpot_median_of_rounds": statistics.median(
                         mine["mean_tpot_ms"] / theirs["mean_tpot_ms"]
                         for mine, theirs in zip(r["rounds"], alone["rounds"], strict=True)),
                     "engine_time": r["engine_s"] / alone["engine_s"] if alone["engine_s"] else None,  # None: no speculation
                     "extra_cpu_ms_per_token": r["cpu_ms_per_token"] - alone["cpu_ms_per_token"]}
              for path, r in results.items() if path != "in_process"}
    report = {**vars(args), "json": str(args.json), "config": str(args.config), "questions": str(args.questions),
              "paths": results, "against_in_process": ratios}
    print("| path | steps | draft s | verify s | CPU ms / token | mean TPOT ms | TPOT vs in-process | "
          "median of rounds' ratios |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path, r in results.items():
        ratio = ratios.get(path, {"tpot": 1.0, "tpot_median_of_rounds": 1.0})
        print(f"| {path} | {r['steps']:.0f} | {r['draft_time_s']:.2f} | {r['verify_time_s']:.2f} | "
              f"{r['cpu_ms_per_token']:.1f} | {r['mean_tpot_ms']:.1f} | {ratio['tpot']:.2f}x | "
              f"{ratio['tpot_median_of_rounds']:.2f}x |")
    print("\nCPU ms per token by process (benchmark: the clients, and the in-process engine):\n")
    print("| path | " + " | ".join(ROLES) + " |")
    print("|---|" + "---:|" * len(ROLES))
    for path, r in results.items():
        print(f"| {path} | " + " | ".join(f"{r['cpu_ms_per_token_by_role'][role]:.1f}" for role in ROLES) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
