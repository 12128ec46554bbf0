"""Autoscaling on SLO signals: replicas over time under a rising, then falling, request rate.

Starts a local Ray with ``configs/autoscaling.yaml`` (the SLO autoscaling policy), then sends
requests (Spec-Bench prompts over the OpenAI HTTP API, Poisson arrivals) at a rate that climbs
from ``--low`` to ``--high`` req/s and back down in ``--phases`` equal steps, then idles, while it
samples the number of running replicas and the replicas' reported load every second. Reports
whether the deployment scaled up under load and back down after, writes OUT.json and plots
rate, replicas and SLO attainment over time to OUT.png.

    python benchmarks/autoscale.py --json OUT.json [--quick] [--config configs/autoscaling.yaml]
        [--low R] [--high R] [--phase-s S] [--cooldown-s S] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import openai
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import DEFAULT_QUESTIONS  # noqa: E402

from specserve.deployments.launch import deploy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rate_schedule(low: float, high: float, phases: int, phase_s: float) -> list[tuple[float, float]]:
    """(start second, rate) steps climbing from ``low`` to ``high`` and back."""
    up = [low + (high - low) * i / max(phases - 1, 1) for i in range(phases)]
    rates = up + up[-2::-1]
    return [(i * phase_s, r) for i, r in enumerate(rates)]


def rate_at(schedule: list[tuple[float, float]], phase_s: float, t: float) -> float:
    """The offered rate at second ``t`` (0 after the last step)."""
    if t >= schedule[-1][0] + phase_s:
        return 0.0
    return next(rate for start, rate in reversed(schedule) if start <= t)


def arrivals(schedule: list[tuple[float, float]], phase_s: float, seed: int) -> list[float]:
    """Poisson arrival times following the piecewise-constant rate."""
    rng = random.Random(seed)
    times = []
    for start, rate in schedule:
        t = start + rng.expovariate(rate)
        while t < start + phase_s:
            times.append(t)
            t += rng.expovariate(rate)
    return times


def replica_count(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


async def run(args: argparse.Namespace, url: str, model: str, questions: list[str]) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    schedule = rate_schedule(args.low, args.high, args.phases, args.phase_s)
    times = arrivals(schedule, args.phase_s, args.seed)
    total_s = len(schedule) * args.phase_s + args.cooldown_s
    samples, results = [], []
    start = time.monotonic()

    async def one(i: int, at: float) -> None:
        await asyncio.sleep(max(start + at - time.monotonic(), 0.0))
        try:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": questions[i % len(questions)]}],
                max_tokens=args.max_new_tokens, temperature=0, extra_body={"ignore_eos": True},
            )
            stats = reply.model_extra["specserve"]
            results.append({"sent_s": at, "status": 200, "slo_attained": stats["slo_attained"]})
        except openai.APIStatusError as exc:
            results.append({"sent_s": at, "status": exc.status_code, "slo_attained": False})

    async def sample() -> None:
        with tqdm(total=int(total_s), desc="seconds") as bar:
            while (now := time.monotonic() - start) < total_s:
                rate = rate_at(schedule, args.phase_s, now)
                replicas = await asyncio.to_thread(replica_count, "specserve")
                samples.append({"t_s": now, "rate": rate, "replicas": replicas})
                bar.set_postfix(rate=f"{rate:.2f}", replicas=replicas)
                bar.update(1)
                await asyncio.sleep(1.0)

    await asyncio.gather(sample(), *(one(i, t) for i, t in enumerate(times)))
    await client.close()
    return {"schedule": schedule, "samples": samples, "requests": results}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in report["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, [s["replicas"] for s in report["samples"]], where="post", label="replicas", color="tab:blue")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("running replicas")
    twin = ax.twinx()
    twin.plot(t, [s["rate"] for s in report["samples"]], color="tab:orange", label="offered rate")
    twin.set_ylabel("offered rate (req/s)")
    fig.legend(loc="upper right")
    ax.set_title("SLO autoscaling: replicas under a rising then falling load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "autoscaling.yaml")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--quick", action="store_true", help="shorter phases (30 s) and cool-down (60 s)")
    parser.add_argument("--low", type=float, default=0.05)
    parser.add_argument("--high", type=float, default=0.4)
    parser.add_argument("--phases", type=int, default=4, help="rate steps up (and as many down)")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds per step (60; 30 with --quick)")
    parser.add_argument("--cooldown-s", type=float, default=None, help="idle seconds at the end (120; 60 quick)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.low <= args.high:
        parser.error("need 0 < --low <= --high")
    args.phase_s = args.phase_s or (30.0 if args.quick else 60.0)
    args.cooldown_s = args.cooldown_s or (60.0 if args.quick else 120.0)
    questions = [json.loads(line)["turns"][0] for line in args.questions.read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(questions)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        deploy(args.config, host="127.0.0.1")
        port = 8000
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        report = asyncio.run(run(args, f"http://127.0.0.1:{port}/v1", model, questions))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    replicas = [s["replicas"] for s in report["samples"]]
    peak_at = max(range(len(replicas)), key=lambda i: replicas[i])
    report.update({
        "min_replicas_start": replicas[0],
        "max_replicas": max(replicas),
        "final_replicas": replicas[-1],
        "scaled_up": max(replicas) > replicas[0],
        "scaled_down_after": replicas[-1] < max(replicas) and peak_at < len(replicas) - 1,
        "slo_attainment": sum(r["slo_attained"] for r in report["requests"]) / max(len(report["requests"]), 1),
        "refused": sum(r["status"] != 200 for r in report["requests"]),
        "config": str(args.config),
    })
    keys = ("min_replicas_start", "max_replicas", "final_replicas", "scaled_up", "scaled_down_after",
            "slo_attainment", "refused")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    json_path = Path(args.json)
    json_path.write_text(json.dumps(report, indent=2))
    plot(report, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
