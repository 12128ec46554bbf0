"""Decode throughput of speculation policies on one closed batch, side by side.

The same ``--batch`` Spec-Bench prompts (chat template, greedy, EOS ignored) are decoded together
by the in-process engine with the default pair under each policy, in ``--rounds`` interleaved
rounds (the policy order rotated per round, so the machine's drift falls on all of them). Every
policy keeps its own controller across rounds, as a running server would. Prints tokens/s per
policy and round, the mean of the per-round ratios to the first policy, MAT, and the controller's
online cost corrections; writes JSON.

    python benchmarks/closed_batch.py --json OUT.json [--batch 8] [--rounds 4] [--policies none auto]
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

from specbench import DEFAULT_QUESTIONS, load_questions  # noqa: E402

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.control.controller import SLOController
from specserve.control.policies import POLICIES
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.stats import SpecStats
from specserve.spec.tree import TreeBudget


def decode_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, tag: str) -> tuple[int, float]:
    """Tokens generated and seconds taken to decode every prompt to the end, all at once."""
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"{tag}-{i}", prompt, params))
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        tokens += sum(len(o.output.token_ids) for o in engine.step() if o.finished)
    return tokens, time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=["none", "auto"],
                        help="the first is the baseline of the ratios")
    parser.add_argument("--speculative", choices=["draft", "ngram", "hybrid"], default="hybrid")
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.max_new_tokens < 1:
        parser.error("--batch, --rounds and --max-new-tokens must be positive")
    return args


def main() -> int:
    args = parse_args()
    config = EngineConfig(
        max_num_seqs=max(args.batch, 1),
        max_model_len=1024,
        max_num_batched_tokens=2048,
        speculative=SpeculativeConfig(method=args.speculative, budget=TreeBudget(depth=4, width=2)),
    )
    engine = LLMEngine(config)  # loads or measures the cost profile that the adaptive policies share
    cost = engine.controller.cost.profile
    controllers = {name: SLOController(name, cost, config.max_num_batched_tokens) for name in args.policies}
    questions = load_questions(args.questions, None)[: args.batch]
    if len(questions) < args.batch:
        raise SystemExit(f"only {len(questions)} questions in {args.questions}")
    prompts = [engine.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)

    engine.controller = controllers[args.policies[0]]
    decode_batch(engine, prompts[:2], params.model_copy(update={"max_tokens": 8}), "warm-up")
    rates: dict[str, list[float]] = {name: [] for name in args.policies}
    stats = {name: SpecStats() for name in args.policies}
    with tqdm(total=args.rounds * len(args.policies), desc="batches") as bar:
        for round_ in range(args.rounds):
            shift = round_ % len(args.policies)
            for name in args.policies[shift:] + args.policies[:shift]:
                engine.controller, engine.spec_stats = controllers[name], SpecStats()
                tokens, seconds = decode_batch(engine, prompts, params, f"r{round_}-{name}")
                rates[name].append(tokens / seconds)
                stats[name].merge(engine.spec_stats)
                bar.set_postfix_str(f"round {round_ + 1}, {name}: {tokens / seconds:.1f} tok/s")
                bar.update()
    engine.shutdown()

    baseline = rates[args.policies[0]]
    report = {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "speculative": args.speculative, "policies": {}}
    print(f"| policy | tok/s per round | mean tok/s | vs {args.policies[0]} | MAT | target scale | verify scale | draft scale |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, controller in controllers.items():
        ratio = statistics.mean(r / b for r, b in zip(rates[name], baseline))
        corrected = controller.cost
        row = {
            "tok_s": rates[name],
            "mean_tok_s": statistics.mean(rates[name]),
            "ratio": ratio,
            "mat": stats[name].mean_accepted_tokens or 1.0,
            "target_scale": None if corrected is None else corrected.scale,
            "verify_scale": None if corrected is None else corrected.verify_scale,
            "draft_scale": None if corrected is None else corrected.draft_scale,
        }
        report["policies"][name] = row
        scales = "| - | - | -" if corrected is None else " ".join(
            f"| {row[key]:.2f}" for key in ("target_scale", "verify_scale", "draft_scale"))
        print(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates[name])} | {row['mean_tok_s']:.1f} "
              f"| {ratio:.2f}x | {row['mat']:.2f} {scales} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
