"""How fast each weight layout multiplies on this CPU, alone and inside the engine.

Part 1 times every layout the CPU can use (``specserve/models/linear_kernel.py``), and the plan
measured for each weight shape (``auto``: a layout per row count, one row run as two where that
is faster), on all of the default target's weights (its 30 layers' four matrices and the
vocabulary head) for steps of 1 to 64 rows. Part 2 runs the engine at batch 1 on Spec-Bench
prompts with each (``EngineConfig.weight_layout``): plain decoding, draft chains of 1 and 3 and a
token tree (hybrid drafter, policy ``fixed``), greedy. They take turns within every round, so the
machine's drift hits all alike; each part reports medians and ratios to the output-major layout.

    python benchmarks/weight_layouts.py --json OUT.json [--rounds N] [--prompts N] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specbench import DEFAULT_QUESTIONS, load_questions  # noqa: E402

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.models.linear_kernel import PlannedWeight, WeightLayout, available_layouts, fastest_plan, linear, to_layout
from specserve.spec.tree import TreeBudget

ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 64)
# SmolLM2-135M's linear weights: (out, in) -> how many the model has
TARGET_WEIGHTS = {(960, 576): 30, (576, 576): 30, (3072, 576): 30, (576, 1536): 30, (49152, 576): 1}
STEPS = {"plain": TreeBudget(depth=0), "chain-k1": TreeBudget(depth=1, width=1),
         "chain-k3": TreeBudget(depth=3, width=1), "tree-d3w2n4": TreeBudget(depth=3, width=2, max_nodes=4)}
PLAN = "auto"  # the kernel plan measured for each weight shape


def multipliers(kind: str, weights: list[torch.Tensor]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Each of ``weights`` as a function of the rows, stored as ``kind`` (a layout, or ``PLAN``)."""
    if kind == PLAN:
        return [functools.partial(PlannedWeight(w, fastest_plan("cpu", tuple(w.shape))), bias=None) for w in weights]
    layout = WeightLayout(kind)
    return [functools.partial(linear, weight=to_layout(w, layout), bias=None, layout=layout) for w in weights]


def time_gemms(kinds: list[str], rounds: int) -> dict[str, dict[int, float]]:
    """Median ms to multiply ``rows`` rows by all the target's weights, per layout or plan."""
    weights = {shape: [torch.randn(*shape) for _ in range(count)] for shape, count in TARGET_WEIGHTS.items()}
    times: dict[str, dict[int, list[float]]] = {kind: defaultdict(list) for kind in kinds}
    with torch.inference_mode():
        for _ in tqdm(range(rounds + 1), desc="GEMM rounds"):
            for kind in kinds:
                stored = {shape: multipliers(kind, ws) for shape, ws in weights.items()}
                for rows in ROWS:
                    start = time.perf_counter()
                    for (_, in_features), multiplies in stored.items():
                        x = torch.randn(rows, in_features)
                        for multiply in multiplies:
                            multiply(x)
                    times[kind][rows].append(1e3 * (time.perf_counter() - start))
    # the first round warms up
    return {name: {rows: statistics.median(ms[1:]) for rows, ms in by_rows.items()} for name, by_rows in times.items()}


def time_engine(kinds: list[str], prompts: list[str], rounds: int, max_new: int) -> dict[str, dict[str, float]]:
    """Tokens/s of each step kind at batch 1 with each layout or plan (prefill included)."""
    engines = {kind: LLMEngine(EngineConfig(
        max_num_seqs=1, weight_layout=kind, control=ControlConfig(policy="fixed"),
        speculative=SpeculativeConfig(method="hybrid"),
    )) for kind in kinds}
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    for _ in tqdm(range(rounds), desc="engine rounds"):
        for text in prompts:
            for name, engine in engines.items():
                prompt = engine.apply_chat_template([{"role": "user", "content": text}])
                for step, budget in STEPS.items():
                    params = SamplingParams(max_tokens=max_new, temperature=0.0, speculation=budget, ignore_eos=True)
                    engine.add_request(engine.make_request("q", prompt, params))
                    start = time.perf_counter()
                    while engine.has_unfinished_requests():
                        engine.step()
                    seconds[name, step] += time.perf_counter() - start
                    tokens[name, step] += max_new
    for engine in engines.values():
        engine.shutdown()
    return {name: {step: tokens[name, step] / seconds[name, step] for step in STEPS} for name in engines}


def plot(gemms: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_rows in gemms.items():
        ax.plot(list(by_rows), list(by_rows.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows in the step")
    ax.set_ylabel("ms for all the target's weights")
    ax.set_title("SmolLM2-135M linears on this CPU (fp32)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=3, help="Spec-Bench questions (of different categories)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    if not args.questions.is_file():
        parser.error(f"questions file {args.questions} not found")
    kinds = [layout.value for layout in available_layouts("cpu")] + [PLAN]
    prompts = [q["turns"][0] for q in load_questions(args.questions, per_category=1)][: args.prompts]

    gemms = time_gemms(kinds, args.rounds)
    engine = time_engine(kinds, prompts, args.rounds, args.max_new_tokens)
    base = WeightLayout.OUTPUT_MAJOR.value
    report = {
        "torch_threads": torch.get_num_threads(),
        "gemm_ms": gemms,
        "engine_tokens_per_s": engine,
        "engine_speed_over_output_major": {name: {step: rate / engine[base][step] for step, rate in steps.items()}
                                           for name, steps in engine.items()},
        "speculation_speedup": {name: {step: rate / steps["plain"] for step, rate in steps.items()}
                                for name, steps in engine.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(gemms, args.json.with_suffix(".png"))

    print("| layout | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    for name, by_rows in gemms.items():
        print(f"| {name} | " + " | ".join(f"{by_rows[r]:.0f} ms" for r in ROWS) + " |")
    print("\n| layout | " + " | ".join(f"{s} tok/s (vs {base})" for s in STEPS) + " |")
    print("|---|" + "---:|" * len(STEPS))
    for name, steps in engine.items():
        ratios = report["engine_speed_over_output_major"][name]
        print(f"| {name} | " + " | ".join(f"{steps[s]:.1f} ({ratios[s]:.2f}x)" for s in STEPS) + " |")
    print(f"\nwrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
