"""Compare speculation policies at scale: the real controller in a discrete-event simulator.

Replays the Azure conversation trace (arrivals rate-scaled to several loads, lengths scaled;
with ``--questions``, prompts as long as the questions the real-engine replay serves) with a
mix of SLO classes against a cost profile (measured here with ``specserve profile``, or a
GPU-class one from published numbers) and a synthetic drafter of a given mean confidence, for
every policy; reports SLO attainment, goodput, TTFT/TPOT and MAT per policy and load, writes
JSON, a markdown table and OUT.png. Deterministic for a seed.

    python benchmarks/simulate.py --profile PROFILE --json OUT.json [--trace PATH] [--requests N]
        [--questions PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_report import DEFAULT_TRACE, chat_prompts, goals, markdown, parse_mix, plot  # noqa: E402

from specserve.config import EngineConfig  # noqa: E402
from specserve.control.cost_model import CostModel  # noqa: E402
from specserve.control.policies import POLICIES  # noqa: E402
from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator  # noqa: E402
from specserve.control.slo import SLOConfig  # noqa: E402
from specserve.control.workload import (  # noqa: E402
    TraceRequest,
    assign_slo_classes,
    read_trace,
    scale_trace,
    summarize,
)
from specserve.engine.inputs import InputProcessor  # noqa: E402
from specserve.models.default_model import default_model_dir  # noqa: E402
from specserve.spec.tree import TreeBudget  # noqa: E402


def question_lengths(path: Path, max_len: int, seed: int) -> list[int]:
    """Token counts of the questions as chat prompts of the default model, in replay.py's order."""
    model = default_model_dir()
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    inputs = InputProcessor(EngineConfig(), model, vocab_size, max_model_len=max_len)
    return [len(p) for p in chat_prompts(inputs.apply_chat_template, path, max_len, seed)]


def build_requests(
    args: argparse.Namespace, trace: list[TraceRequest], rate: float, slo: SLOConfig, prompt_lengths: list[int] | None
) -> list[SimRequest]:
    """The trace at ``rate``; prompts cycle through ``prompt_lengths`` when given."""
    scaled = scale_trace(trace, rate, args.max_prompt, args.max_output)
    classes = assign_slo_classes(len(scaled), parse_mix(args.slo_mix, set(slo.classes)), args.seed)
    return [
        SimRequest(
            f"r{i}",
            r.prompt_tokens if prompt_lengths is None else prompt_lengths[i % len(prompt_lengths)],
            r.output_tokens,
            slo.resolve(name, None, None),
            r.arrival_s,
        )
        for i, (r, name) in enumerate(zip(scaled, classes))
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, required=True, help="cost profile JSON")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--requests", type=int, default=None, help="first N trace requests (default: all)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 4, 8], help="loads in requests/s")
    parser.add_argument("--policies", nargs="+", default=sorted(POLICIES), choices=sorted(POLICIES))
    parser.add_argument("--questions", type=Path, default=None,
                        help="prompts as long as these questions' (JSON lines, e.g. the Spec-Bench dev set) "
                             "through the default model's chat template, cycled as replay.py does")
    parser.add_argument("--max-prompt", type=int, default=512,
                        help="longest prompt after scaling (with --questions: longest question kept)")
    parser.add_argument("--max-output", type=int, default=256, help="longest output after scaling")
    parser.add_argument("--confidence", type=float, default=0.45,
                        help="mean draft confidence of the synthetic drafter (0.45: the CPU pair here)")
    parser.add_argument("--slo-mix", default="interactive=0.4,chat=0.4,batch=0.2")
    parser.add_argument("--slo-scale", type=float, default=1.0, help="multiply every class's targets")
    parser.add_argument("--depth", type=int, default=4, help="the largest tree: depth")
    parser.add_argument("--width", type=int, default=2, help="the largest tree: width")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--on-miss", choices=["best_effort", "reject"], default="best_effort",
                        help="requests that can no longer make their TTFT SLO: serve them anyway, or reject early")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in (args.trace, args.questions):
        if path is not None and not path.is_file():
            parser.error(f"{path} not found")
    cost = CostModel.load(args.profile)
    slo = SLOConfig().scaled(args.slo_scale)
    acceptance = AcceptanceModel(mean_confidence=args.confidence)
    prompt_lengths = None if args.questions is None else question_lengths(args.questions, args.max_prompt, args.seed)
    trace = read_trace(args.trace, args.requests)
    results: dict[str, list[dict]] = {name: [] for name in args.policies}
    for rate in tqdm(args.rates, desc="loads", unit="load"):
        for name in args.policies:
            config = SimConfig(
                policy=name,
                max_budget=TreeBudget(depth=args.depth, width=args.width),
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                on_miss=args.on_miss,
                seed=args.seed,
            )
            simulator = Simulator(config, cost, acceptance)
            start = time.perf_counter()
            outcomes, span = simulator.run(build_requests(args, trace, rate, slo, prompt_lengths))
            wall = time.perf_counter() - start
            row = {"load": rate, **summarize(outcomes, span)}
            row["controller_overhead"] = simulator.controller.decision_seconds / max(simulator.busy_s, 1e-9)
            row["iterations"] = simulator.iterations
            row["simulated_s"] = span
            row["wall_s"] = wall
            results[name].append(row)
    table = markdown(args.rates, results)
    print(table)
    summary = {
        "profile": str(args.profile),
        "model": cost.model,
        "confidence": args.confidence,
        "questions": None if args.questions is None else str(args.questions),
        "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in build_requests(args, trace, 1.0, slo, prompt_lengths)),
        "loads": args.rates,
        "policies": results,
        "goals": goals(args.rates, results) if "auto" in results else {},
    }
    print(json.dumps(summary["goals"], indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    plot_path = args.json.with_suffix(".png")
    plot(args.rates, results, plot_path, f"Simulated: {cost.model} on {cost.device}, draft confidence {args.confidence}")
    print(f"wrote {args.json} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
