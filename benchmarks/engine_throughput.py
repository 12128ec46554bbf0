"""Decode throughput of the specserve engine against HF transformers, in one process.

Measures generated tokens per second (greedy, exactly N new tokens per request) on the default
model for: HF ``generate`` at batch 1, our engine at batch 1 (same prompt), and our engine with
16 concurrent requests (16 different prompts). Prompts are the first turns of SpecBench questions
wrapped in the chat template. Each configuration is warmed up once, then the three are run
interleaved per repetition and the median tokens/s is reported. Also checks that our batch-1
greedy tokens equal HF's for the same prompt.

    python benchmarks/engine_throughput.py --json OUT.json [--quick] [--new-tokens N] [--reps N]

Goals: speedup_vs_hf_batch1 >= 1.3, batch16_over_batch1 >= 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/specbench/dev.jsonl"
BATCH = 16
GOALS = {"speedup_vs_hf_batch1": 1.3, "batch16_over_batch1": 4.0}


def load_questions(n: int) -> list[str]:
    """First-turn text of the first ``n`` SpecBench questions."""
    with DATA.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    return [row["turns"][0] for row in rows]


def hf_generate(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds for one HF greedy generate of exactly ``n`` tokens, and the generated ids."""
    input_ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            min_new_tokens=n,
            max_new_tokens=n,
            do_sample=False,
        )
    elapsed = time.perf_counter() - start
    return elapsed, out[0, len(prompt) :].tolist()


class EngineRunner:
    """Runs batches of requests to completion on one engine, with unique request ids."""

    def __init__(self, engine: LLMEngine, n: int) -> None:
        self.engine, self.counter = engine, 0
        self.params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def run(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        """Seconds from adding all requests until all are done, and each request's tokens."""
        requests = [self.engine.make_request(f"r{self.counter + i}", p, self.params)
                    for i, p in enumerate(prompts)]
        self.counter += len(prompts)
        tokens: dict[str, list[int]] = {}
        start = time.perf_counter()
        for request in requests:
            self.engine.add_request(request)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    tokens[out.request_id] = out.output.token_ids
        elapsed = time.perf_counter() - start
        return elapsed, [tokens[r.request_id] for r in requests]


def greedy_match(ours: list[int], hf: list[int], eos_ids: set[int]) -> tuple[bool, int]:
    """Compare up to our first EOS: HF's min_new_tokens bans EOS, while ignore_eos keeps it."""
    k = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
    return ours[:k] == hf[:k], k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repetition")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n, reps = (32, 1) if args.quick else (args.new_tokens, args.reps)
    torch.manual_seed(0)

    engine = LLMEngine(EngineConfig(max_num_seqs=BATCH))
    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32).eval()
    tok = engine.tokenizer
    hf.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}])
               for q in load_questions(BATCH)]
    runner = EngineRunner(engine, n)
    print(f"{n} new tokens, {reps} rep(s), batch-1 prompt {len(prompts[0])} tokens, "
          f"batch-{BATCH} prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{torch.get_num_threads()} threads")

    cases: dict[str, tuple[Callable[[], tuple[float, object]], int]] = {
        "hf_batch1_tok_s": (lambda: hf_generate(hf, prompts[0], n), n),
        "ours_batch1_tok_s": (lambda: runner.run(prompts[:1]), n),
        f"ours_batch{BATCH}_tok_s": (lambda: runner.run(prompts), BATCH * n),
    }
    # Warm-up, which also gives the tokens for the correctness check.
    warm = {name: fn()[1] for name, (fn, _) in cases.items()}
    match, compared = greedy_match(warm["ours_batch1_tok_s"][0], warm["hf_batch1_tok_s"],
                                   set(engine.eos_token_ids))
    print(f"greedy tokens match HF: {match} (first {compared} tokens compared)")

    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in tqdm(range(reps), desc="reps"):
        for name, (fn, tokens) in cases.items():  # interleaved: noise hits all equally
            rates[name].append(tokens / fn()[0])
    engine.shutdown()

    result: dict[str, float | bool] = {name: statistics.median(r) for name, r in rates.items()}
    result["speedup_vs_hf_batch1"] = result["ours_batch1_tok_s"] / result["hf_batch1_tok_s"]
    result["batch16_over_batch1"] = result[f"ours_batch{BATCH}_tok_s"] / result["ours_batch1_tok_s"]
    result["greedy_tokens_match_hf"] = match

    print("\n| config | tokens/s (median) | all reps |\n|---|---:|---|")
    for name, r in rates.items():
        print(f"| {name.removesuffix('_tok_s')} | {result[name]:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in r)} |")
    print()
    for ratio, goal in GOALS.items():
        verdict = "met" if result[ratio] >= goal else "NOT met"
        print(f"{ratio}: {result[ratio]:.2f}x (goal >= {goal}x, {verdict})")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}:\n{json.dumps(result, indent=2)}")


if __name__ == "__main__":
    main()
