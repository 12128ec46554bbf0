"""Trace replay: SLO attainment and goodput of every speculation policy, from light load to overload.

Replays, in real time on the in-process engine with the default model pair, the arrival times of
the Azure LLM inference conversation trace, compressed or stretched to each load (requests/s), with
a mix of SLO classes. Request i's prompt is a Spec-Bench dev question (its first turn through the
chat template; questions are shuffled once so categories interleave, and the few too long for the
KV slot are skipped), used as is: the trace's prompt lengths are not replayed. Its output length
is the trace's, scaled so the longest is ``--max-new-tokens``, decoded to the end (EOS ignored).

One engine serves every run: it is built with policy ``auto`` (loading or measuring the cost
profile once) and each policy's controller is swapped in for its runs, so the model loads once.
Every policy keeps one controller across the loads, like an engine per policy would. For each
load and policy it reports SLO attainment, goodput, mean and p99 TTFT and TPOT and MAT, and checks
the goals: auto attains at every load at least every other policy minus 0.02; at the highest load,
auto's attainment and goodput over the better of none / fixed; at the lowest load, auto's mean
TPOT over none's.

    python benchmarks/replay.py --json OUT.json [--trace PATH] [--questions PATH] [--quick]
        [--rates 0.3 1 2 4] [--requests N] [--max-new-tokens N] [--policies none auto ...]
        [--slo-mix interactive=0.4,chat=0.4,batch=0.2] [--slo-scale F] [--seed N]
        [--speculative draft|ngram|hybrid] [--draft-model DIR] [--rounds N]

With ``--rounds N`` every (load, policy) run is repeated N times, interleaved with the others,
and its row pools the N runs' requests. Writes OUT.json, prints a markdown table and plots attainment and goodput vs load to OUT.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_report import DEFAULT_TRACE, chat_prompts, goals, markdown, parse_mix, plot  # noqa: E402
from specbench import DEFAULT_QUESTIONS  # noqa: E402

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.control.controller import SLOController
from specserve.control.policies import POLICIES
from specserve.control.slo import SLO, SLOConfig
from specserve.control.workload import (
    Outcome,
    TraceRequest,
    assign_slo_classes,
    read_trace,
    scale_trace,
    summarize,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import FinishReason, RequestOutput
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.tree import TreeBudget

DEFAULT_RATES = [0.3, 1.0, 2.0, 4.0]
DEFAULT_MIX = "interactive=0.4,chat=0.4,batch=0.2"
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Job:
    """One request of a replay: when it arrives (s after the start) and what it asks for."""

    arrival_s: float
    prompt: list[int]
    max_tokens: int
    slo_class: str
    slo: SLO


def make_jobs(
    trace: list[TraceRequest], prompts: list[list[int]], classes: list[str], slos: dict[str, SLO]
) -> list[Job]:
    """The trace's arrivals and output lengths, with cycled prompts and the given SLO classes."""
    return [
        Job(r.arrival_s, prompts[i % len(prompts)], r.output_tokens, name, slos[name])
        for i, (r, name) in enumerate(zip(trace, classes))
    ]


def outcome(output: RequestOutput, slo: SLO) -> Outcome:
    """What a finished request achieved; its decode steps are its distinct token times after the first."""
    if output.output.finish_reason is FinishReason.ERROR:
        raise RuntimeError(f"request {output.request_id} failed: {output.error}")
    return Outcome(
        slo=slo,
        ttft_s=output.metrics.ttft,
        tpot_s=output.metrics.tpot,
        output_tokens=len(output.output.token_ids),
        verify_steps=max(len(set(output.metrics.token_times)) - 1, 0),
        rejected=output.output.finish_reason is FinishReason.REJECTED,
    )


def replay(engine: LLMEngine, jobs: list[Job], tag: str, bar: tqdm) -> tuple[list[Outcome], float]:
    """Serve ``jobs`` at their arrival times: their outcomes, and the seconds from the first
    arrival (the trace's start) to the last finish."""
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be idle before a replay")
    pending = deque(enumerate(jobs))
    slo_of: dict[str, SLO] = {}
    outcomes: list[Outcome] = []
    start = time.monotonic()
    while pending or engine.has_unfinished_requests():
        now = time.monotonic()
        while pending and start + pending[0][1].arrival_s <= now:
            i, job = pending.popleft()
            request_id = f"{tag}-{i}"
            params = SamplingParams(
                max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True, slo_class=job.slo_class
            )
            arrival = start + job.arrival_s  # queueing since the scheduled arrival counts
            engine.add_request(engine.make_request(request_id, job.prompt, params, arrival_time=arrival))
            slo_of[request_id] = job.slo
        if not engine.has_unfinished_requests():
            time.sleep(max(start + pending[0][1].arrival_s - now, 0.0))
            continue
        for output in engine.step():
            if output.finished:
                outcomes.append(outcome(output, slo_of.pop(output.request_id)))
                bar.update()
    return outcomes, time.monotonic() - start


def run_all(
    engine: LLMEngine,
    controllers: dict[str, SLOController],
    workloads: dict[float, list[Job]],
    rounds: int = 1,
) -> dict[str, list[dict]]:
    """Every load under every policy, ``rounds`` times; each (load, policy) row pools its rounds.

    Loads and rounds are outer and the policy order rotates by round, so machine drift, which
    moves a run on this machine by more than the policies differ, hits every policy alike.
    """
    names = list(controllers)
    outcomes: dict[tuple[float, str], list[Outcome]] = {(r, n): [] for r in workloads for n in names}
    seconds = dict.fromkeys(outcomes, 0.0)
    decided = dict.fromkeys(outcomes, 0.0)
    total = sum(len(j) for j in workloads.values()) * len(names) * rounds
    with tqdm(total=total, desc="requests") as bar:
        for round_ in range(rounds):
            for rate, jobs in workloads.items():
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    bar.set_postfix_str(f"round {round_ + 1}, {rate:g} req/s, {name}")
                    controller = engine.controller = controllers[name]
                    before = controller.decision_seconds
                    served, duration = replay(engine, jobs, f"{name}-{rate:g}-{round_}", bar)
                    outcomes[rate, name] += served
                    seconds[rate, name] += duration
                    decided[rate, name] += controller.decision_seconds - before
    return {
        name: [
            {"load": rate, **summarize(outcomes[rate, name], seconds[rate, name]),
             "duration_s": seconds[rate, name], "controller_s": decided[rate, name], "rounds": rounds}
            for rate in workloads
        ]
        for name in names
    }


def warm_up(
    engine: LLMEngine, controllers: dict[str, SLOController], prompts: list[list[int]], slos: dict[str, SLO]
) -> None:
    """Two short concurrent requests under every controller: first forwards, first calibration."""
    jobs = [Job(0.0, prompts[i], 8, name, slos[name]) for i, name in enumerate(sorted(slos)[:2])]
    with tqdm(total=len(jobs) * len(controllers), desc="warm-up", leave=False) as bar:
        for name, controller in controllers.items():
            engine.controller = controller
            replay(engine, jobs, f"warm-{name}", bar)


def parse_args() -> argparse.Namespace:
    """The command line, checked, with the --quick defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="results file (the plot goes next to it)")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--quick", action="store_true", help="40 requests, 32 new tokens at most")
    parser.add_argument("--rates", type=float, nargs="+", default=DEFAULT_RATES, help="loads, requests/s")
    parser.add_argument("--requests", type=int, default=None, help="per run (default 100, 40 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest output (64; 32 with --quick)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--slo-mix", default=DEFAULT_MIX, help=f"class weights (default {DEFAULT_MIX})")
    parser.add_argument("--slo-scale", type=float, default=1.0,
                        help="multiply every class's targets (the classes are sized for a 30 ms/token CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SLO classes and question order")
    parser.add_argument("--rounds", type=int, default=1,
                        help="replay every (load, policy) this many times, interleaved, and pool them")
    parser.add_argument("--speculative", choices=["draft", "ngram", "hybrid"], default="hybrid",
                        help="the drafter every speculating policy uses (default: hybrid, the draft model and lookups)")
    parser.add_argument("--draft-model", default=None, help="draft directory (default: the distilled default draft)")
    args = parser.parse_args()
    for path in (args.trace, args.questions):
        if not path.is_file():
            parser.error(f"{path} not found")
    if any(r <= 0 for r in args.rates):
        parser.error("--rates must be positive")
    if args.slo_scale <= 0:
        parser.error("--slo-scale must be positive")
    args.requests = args.requests or (40 if args.quick else 100)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 64)
    if args.requests < 2 or args.max_new_tokens < 1 or args.rounds < 1:
        parser.error("--requests must be at least 2, --max-new-tokens and --rounds at least 1")
    try:
        args.slo_mix = parse_mix(args.slo_mix, set(SLOConfig().classes))
    except ValueError as exc:
        parser.error(f"--slo-mix: {exc}")
    args.rates = sorted(set(args.rates))
    args.policies = list(dict.fromkeys(args.policies))
    return args


def main() -> int:
    """Build the engine and workloads, replay every load under every policy, report."""
    args = parse_args()
    config = EngineConfig(
        max_num_seqs=16,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=512,
        speculative=SpeculativeConfig(
            method=args.speculative, draft_model=args.draft_model, budget=TreeBudget(depth=4, width=2)
        ),
        control=ControlConfig(policy="auto", slo=SLOConfig().scaled(args.slo_scale)),
    )
    slo_config = config.control.slo
    engine = LLMEngine(config)  # loads or measures the cost profile that the adaptive policies share
    cost = engine.controller.cost.profile
    controllers = {name: SLOController(name, cost, config.max_num_batched_tokens) for name in args.policies}
    slos = {name: slo_config.resolve(name, None, None) for name in slo_config.classes}

    prompts = chat_prompts(engine.apply_chat_template, args.questions, MAX_MODEL_LEN - args.max_new_tokens, args.seed)
    trace = read_trace(args.trace, args.requests)
    classes = assign_slo_classes(len(trace), args.slo_mix, args.seed)
    workloads = {
        rate: make_jobs(scale_trace(trace, rate, MAX_MODEL_LEN, args.max_new_tokens), prompts, classes, slos)
        for rate in args.rates
    }

    jobs = workloads[args.rates[0]]  # every load has the same requests, at other times
    warm_up(engine, controllers, prompts, slos)
    results = run_all(engine, controllers, workloads, args.rounds)
    engine.shutdown()

    report = {
        "loads": args.rates,
        "policies": results,
        "goals": goals(args.rates, results) if "auto" in results else {},
        "requests": len(trace),
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "mean_prompt_tokens": sum(len(j.prompt) for j in jobs) / len(jobs),
        "mean_output_tokens": sum(j.max_tokens for j in jobs) / len(jobs),
        "slo_mix": args.slo_mix,
        "slo_scale": args.slo_scale,
        "slo_classes": {name: slo.model_dump() for name, slo in slos.items()},
        "trace": str(args.trace),
        "questions": str(args.questions),
        "engine": config.model_dump(mode="json"),
    }
    print(markdown(args.rates, results))
    print(json.dumps(report["goals"], indent=1))
    json_path = Path(args.json)
    json_path.write_text(json.dumps(report, indent=2))
    plot_path = json_path.with_suffix(".png")
    plot(args.rates, results, plot_path, "Azure conversation trace replay, SmolLM2-135M-Instruct + distilled draft")
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
