"""Spec-Bench-style speculative decoding benchmark at batch 1, greedy, on the default model pair.

For every question, every configuration runs back to back (plain decoding, draft-model chains
k=1..8, draft-model trees, n-gram lookup, and hybrid chains and trees: the draft model's tree
merged with the lookup's), so machine noise hits them alike; speedups are
tokens/s over plain decoding measured in the same run. Also checks that every configuration's
output equals plain greedy decoding, and times one draft step against one target decode step.

A configuration's speedup is the tokens it emits per decode step over the cost of one of its
steps (drafting and verifying) in plain decode steps. Each row reports tokens per step (MAT where
every step verifies a tree; lower where some steps draft nothing, as lookups without a match),
that step cost (tokens per step / speedup), and the tokens per step the goal's speedup would need
at that cost: what the drafter would have to achieve on this machine.

    python benchmarks/specbench.py --json OUT.json [--questions PATH] [--quick] [--max-new-tokens N]
        [--per-category N] [--draft-model DIR] [--configs NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.models.forward_batch import SequenceSlice
from specserve.spec.stats import SpecStats
from specserve.spec.tree import TreeBudget

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench" / "dev.jsonl"
GOAL_SPEEDUP, GOAL_MAT = 2.0, 2.5


@dataclass
class Config:
    name: str
    method: str  # "plain", "draft", "ngram" or "hybrid"
    budget: TreeBudget = field(default_factory=lambda: TreeBudget(depth=0))


def configs() -> list[Config]:
    trees = [(3, 2, 4), (4, 2, 6), (5, 2, 8), (6, 3, 12), (8, 4, 16)]
    out = [Config("plain", "plain")]
    out += [Config(f"chain-k{k}", "draft", TreeBudget(depth=k, width=1)) for k in range(1, 9)]
    out += [Config(f"tree-d{d}w{w}n{n}", "draft", TreeBudget(depth=d, width=w, max_nodes=n)) for d, w, n in trees]
    out += [Config("ngram-k5", "ngram", TreeBudget(depth=5, width=1))]
    out += [Config(f"hybrid-k{k}", "hybrid", TreeBudget(depth=k, width=1)) for k in (1, 2, 3)]
    out += [Config(f"hybrid-d{d}w{w}n{n}", "hybrid", TreeBudget(depth=d, width=w, max_nodes=n)) for d, w, n in trees[:2]]
    return out


def load_questions(path: Path, per_category: int | None) -> list[dict]:
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if per_category is not None:
        by_category: dict[str, list[dict]] = defaultdict(list)
        for q in questions:
            by_category[q["category"]].append(q)
        questions = [q for qs in by_category.values() for q in qs[:per_category]]
    return questions


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, SpecStats | None]:
    start = time.perf_counter()
    engine.add_request(engine.make_request("q", prompt, params))
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final = output
    if final.error:
        raise RuntimeError(final.error)
    return final.output.token_ids, time.perf_counter() - start, final.spec_stats


def step_costs(engine: LLMEngine, context: int = 256, reps: int = 50) -> dict[str, float]:
    """Median ms of batch-1 decode steps at the same context: a target forward, a draft forward
    right after it (the target has pushed the draft's weights out of the CPU caches, as before a
    tree's first depth) and a second draft forward (warm, as at the depths after the first).
    They are timed in turn, so that all three see the same state of a noisy machine."""
    forwards = {
        "target_step_ms": engine.executor.runner.forward,
        "draft_step_ms": engine.drafter.profile_forward,
        "warm_draft_step_ms": engine.drafter.profile_forward,
    }
    step = [SequenceSlice(0, [2], [context], context, logits_at=[0])]
    for forward in forwards.values():
        forward([SequenceSlice(0, [1] * context, list(range(context)), 0, logits_at=[context - 1])])
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(reps):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward(step)
            times[name].append(time.perf_counter() - start)
    costs = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return costs | {"draft_over_target": costs["draft_step_ms"] / costs["target_step_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--quick", action="store_true", help="2 questions per category, 64 new tokens")
    parser.add_argument("--per-category", type=int, default=None, help="questions per category (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (64 with --quick)")
    parser.add_argument("--draft-model", default=None, help="draft directory (default: the distilled default draft)")
    parser.add_argument("--draft-dtype", default="auto",
                        choices=SpeculativeConfig.model_fields["draft_dtype"].annotation.__args__,
                        help="the draft model's dtype (default: auto, int8 on most CPUs)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                        help="run only these configurations (plain always runs); default: all")
    args = parser.parse_args()
    if not args.questions.is_file():
        parser.error(f"questions file {args.questions} not found")
    max_new = args.max_new_tokens or (64 if args.quick else 128)
    questions = load_questions(args.questions, args.per_category or (2 if args.quick else None))
    plan = configs()
    if args.configs:
        unknown = set(args.configs) - {c.name for c in plan}
        if unknown:
            parser.error(f"unknown configurations {sorted(unknown)}; known: {[c.name for c in plan]}")
        plan = [c for c in plan if c.name == "plain" or c.name in args.configs]

    # Every configuration is a fixed per-request budget: measure the mechanism, not a policy.
    base = dict(max_num_seqs=1, max_num_batched_tokens=2048, control=ControlConfig(policy="fixed"))
    def engine(method: str) -> LLMEngine:
        return LLMEngine(EngineConfig(**base, speculative=SpeculativeConfig(
            method=method, draft_model=args.draft_model, draft_dtype=args.draft_dtype)))

    draft_engine = engine("draft")
    engines = {"plain": draft_engine, "draft": draft_engine}
    engines |= {m: engine(m) for m in ("ngram", "hybrid") if any(c.method == m for c in plan)}
    costs = step_costs(draft_engine)

    tokens: dict[tuple[str, str], int] = defaultdict(int)
    decoded: dict[tuple[str, str], int] = defaultdict(int)  # tokens after the first (which prefill emits)
    decode_steps: dict[tuple[str, str], int] = defaultdict(int)  # each emits one token plus its accepted drafts
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    stats: dict[tuple[str, str], SpecStats] = defaultdict(SpecStats)
    mismatches: dict[str, int] = defaultdict(int)
    warm = draft_engine.apply_chat_template([{"role": "user", "content": "Hello!"}])
    for config in plan:
        params = SamplingParams(max_tokens=8, temperature=0.0, speculation=config.budget)
        generate(engines[config.method], warm, params)
    for q in tqdm(questions, desc="questions"):
        prompt = draft_engine.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
        reference = None
        for config in plan:
            params = SamplingParams(max_tokens=max_new, temperature=0.0, speculation=config.budget)
            out, elapsed, spec = generate(engines[config.method], prompt, params)
            reference = out if reference is None else reference
            mismatches[config.name] += out != reference
            for key in ((config.name, q["category"]), (config.name, "overall")):
                tokens[key] += len(out)
                decoded[key] += len(out) - 1
                decode_steps[key] += len(out) - 1 - (spec.accepted if spec is not None else 0)
                seconds[key] += elapsed
                if spec is not None:
                    stats[key].merge(spec)

    categories = sorted({q["category"] for q in questions}) + ["overall"]

    def summary(name: str, category: str) -> dict:
        rate = tokens[name, category] / seconds[name, category]
        plain = tokens["plain", category] / seconds["plain", category]
        mat = stats[name, category].mean_accepted_tokens if (name, category) in stats else 1.0
        per_step = decoded[name, category] / decode_steps[name, category]
        return {"tokens_per_s": rate, "speedup": rate / plain, "mean_accepted_tokens": mat, "tokens_per_step": per_step}

    results = []
    for config in plan:
        per_category = {c: summary(config.name, c) for c in categories}
        overall = per_category.pop("overall")
        results.append({
            "name": config.name,
            "method": config.method,
            "budget": config.budget.model_dump(),
            "overall_speedup": overall["speedup"],
            "mean_accepted_tokens": overall["mean_accepted_tokens"],
            "tokens_per_s": overall["tokens_per_s"],
            "tokens_per_step": overall["tokens_per_step"],
            "step_cost": overall["tokens_per_step"] / overall["speedup"],
            "tokens_per_step_for_goal": GOAL_SPEEDUP * overall["tokens_per_step"] / overall["speedup"],
            "outputs_differing_from_plain": mismatches[config.name],
            "acceptance_by_depth": stats[config.name, "overall"].acceptance_by_depth,
            "per_category": per_category,
        })
    best = max(results[1:], key=lambda r: r["overall_speedup"])
    report = {
        "best_config": best["name"],
        "overall_speedup": best["overall_speedup"],
        "mean_accepted_tokens": best["mean_accepted_tokens"],
        "per_category": best["per_category"],
        "configs": results,
        "questions": len(questions),
        "max_new_tokens": max_new,
        "draft_dtype": draft_engine.config.draft_dtype(),
        **costs,
    }
    print(markdown(results, categories[:-1]))
    print(f"\nbest: {best['name']}  overall_speedup {best['overall_speedup']:.2f}x (goal >= {GOAL_SPEEDUP})  "
          f"MAT {best['mean_accepted_tokens']:.2f} (goal >= {GOAL_MAT})")
    print(f"draft step {costs['draft_step_ms']:.2f} ms (warm {costs['warm_draft_step_ms']:.2f} ms) "
          f"vs target step {costs['target_step_ms']:.2f} ms "
          f"= {100 * costs['draft_over_target']:.1f}% (goal <= 10%; draft in {report['draft_dtype']})")
    Path(args.json).write_text(json.dumps(report, indent=2))
    plot_path = Path(args.json).with_suffix(".png")
    plot(results, plot_path)
    print(f"wrote {args.json} and {plot_path}")
    for each in {id(e): e for e in engines.values()}.values():
        each.shutdown()
    return 0


def plot(results: list[dict], path: Path) -> None:
    """Speedup and MAT per configuration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, (ax_speed, ax_mat) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_speed.bar(names, [r["overall_speedup"] for r in results], color="tab:blue")
    ax_speed.axhline(1.0, color="gray", lw=1)
    ax_speed.set_ylabel("speedup over plain decoding (tokens/s)")
    ax_mat.bar(names, [r["mean_accepted_tokens"] for r in results], color="tab:green")
    ax_mat.set_ylabel("mean accepted tokens per verification (MAT)")
    for ax in (ax_speed, ax_mat):
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle("Spec-Bench at batch 1, greedy, SmolLM2-135M-Instruct + distilled draft")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list[dict], categories: list[str]) -> str:
    short = [c[:10] for c in categories]
    lines = [
        f"| config | tok/s | speedup | MAT | tok/step | step cost | tok/step for {GOAL_SPEEDUP}x | "
        + " | ".join(short) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(categories),
    ]
    for r in results:
        cells = [f"{r['per_category'][c]['speedup']:.2f}x" for c in categories]
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['overall_speedup']:.2f}x | "
            f"{r['mean_accepted_tokens']:.2f} | {r['tokens_per_step']:.2f} | {r['step_cost']:.2f} | "
            f"{r['tokens_per_step_for_goal']:.2f} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
