"""Per-iteration cost of running workers as Ray actors instead of in the engine's process.

Decodes the same greedy batch, side by side in one run, with (a) the draft model co-located vs
on its own Ray actor (one Ray call per step), and (b) TP=3 (the default model has 9 heads) with
ranks 1-2 as local processes vs as Ray actors in a placement group (calls go over gloo either
way). Reports the mean step time of
each and the added milliseconds per step. Outputs must match within each pair.

    python benchmarks/actor_overhead.py --json OUT.json [--quick] [--batch N] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.tree import TreeBudget

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how vaccines work.",
           "List five uses of a paperclip.", "What is the capital of Japan? Answer briefly.",
           "Describe the water cycle.", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "Summarize the plot of Hamlet."]


def decode(config: EngineConfig, prompts: list[str], tokens: int) -> tuple[list[float], list[list[int]]]:
    """Step times (s) of greedy decoding ``prompts`` after their prefill, and the outputs."""
    engine = LLMEngine(config)
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        ids = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        for i, prompt in enumerate(ids):
            engine.add_request(engine.make_request(f"r{i}", prompt, params))
        times, finals = [], {}
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            times.append(time.perf_counter() - start)
            finals.update({o.request_id: o.output.token_ids for o in outputs if o.finished})
        return times[2:], [finals[f"r{i}"] for i in range(len(prompts))]  # skip the prefill steps
    finally:
        engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--quick", action="store_true", help="32 tokens instead of 64")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=None)
    args = parser.parse_args()
    tokens = args.tokens or (32 if args.quick else 64)
    prompts = (PROMPTS * ((args.batch + len(PROMPTS) - 1) // len(PROMPTS)))[: args.batch]
    torch.set_grad_enabled(False)
    ray.init(include_dashboard=False, log_to_driver=False)
    spec = dict(budget=TreeBudget(depth=3, width=1), draft_num_cpus=0)
    fixed = ControlConfig(policy="fixed")
    pairs = {
        "draft": [
            ("colocated", EngineConfig(speculative=SpeculativeConfig(**spec), control=fixed)),
            ("actor", EngineConfig(speculative=SpeculativeConfig(draft_placement="actor", **spec), control=fixed)),
        ],
        "tp3": [
            ("process", EngineConfig(tensor_parallel_size=3)),
            ("ray", EngineConfig(tensor_parallel_size=3, worker_backend="ray")),
        ],
    }
    report = {"batch": args.batch, "tokens": tokens}
    try:
        for name, ((base_name, base), (actor_name, actor)) in pairs.items():
            base_times, base_out = decode(base, prompts, tokens)
            actor_times, actor_out = decode(actor, prompts, tokens)
            base_ms, actor_ms = statistics.fmean(base_times) * 1e3, statistics.fmean(actor_times) * 1e3
            report[name] = {
                f"{base_name}_step_ms": base_ms,
                f"{actor_name}_step_ms": actor_ms,
                "added_ms_per_step": actor_ms - base_ms,
                "added_share": actor_ms / base_ms - 1,
                "outputs_equal": base_out == actor_out,
            }
            print(f"{name}: {base_name} {base_ms:.1f} ms/step, {actor_name} {actor_ms:.1f} ms/step "
                  f"({actor_ms - base_ms:+.1f} ms, {actor_ms / base_ms - 1:+.1%}); outputs equal: {base_out == actor_out}")
    finally:
        ray.shutdown()
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
