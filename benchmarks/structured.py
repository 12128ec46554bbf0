"""Structured output on the default model: what a JSON-schema constraint costs, and what drafting
the tokens it forces (and speculating besides) gains, at batch 1, greedy.

Every prompt asks the chat model for a person as JSON under one schema; each mode runs it back
to back, in turns for ``--rounds`` rounds (every other round in reverse order), so that the
machine's drift falls on all modes alike:

- ``constrained``: the schema, no drafting at all (the request's speculation depth is 0);
- ``forced``: the schema, the tokens it forces drafted from the constraint and verified;
- ``forced+hybrid``: the same on an engine that also drafts with the default draft and prompt
  lookup, its ``auto`` policy choosing how much (as ``configs/default.yaml`` serves).

Reports tokens/s and the speedup over ``constrained``, tokens per decode step, the share of
output tokens that came from forced drafts, and that every output parses and has the schema's
keys; the modes' outputs must be identical (they are lossless). What the constraint itself
costs a token (the allowed tokens and the forced ones, as the engine asks every step) is timed
by replaying the outputs through a fresh constraint.

    python benchmarks/structured.py --json OUT.json [--prompts N] [--rounds N] [--max-new-tokens N] [--compact]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from specserve.config import ControlConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.llm import LLM
from specserve.spec.tree import TreeBudget

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = [
    "Alice, 30, lives in Paris, likes chess", "Bob, 45, Tokyo, golf and sushi", "Carol, 22, Lima, running",
    "Dan, 60, Oslo, skiing and books", "Eve, 35, Cairo, photography", "Frank, 28, Toronto, hockey and music",
    "Grace, 51, Sydney, gardening", "Hiro, 39, Kyoto, tea ceremony and hiking",
]
MODES = ["constrained", "forced", "forced+hybrid"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--prompts", type=int, default=len(PEOPLE))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--compact", action="store_true",
                        help="JSON without optional whitespace (llguidance's whitespace_flexible off)")
    return parser.parse_args()


def run_mode(engine: LLMEngine, mode: str, prompt: list[int], max_tokens: int, schema: dict) -> dict:
    drafting = {"speculation": TreeBudget(depth=0)} if mode == "constrained" else {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, structured=StructuredOutput(json_schema=schema),
                            output_kind="final_only", **drafting)
    engine.add_request(engine.make_request(f"{mode}-{time.monotonic_ns()}", prompt, params))
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        finals = engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    output = finals[0]
    spec = output.spec_stats
    return {"tokens": len(output.output.token_ids), "token_ids": output.output.token_ids, "seconds": seconds,
            "steps": steps,
            "drafted_accepted": spec.accepted if spec else 0, "text": output.output.text}


def constraint_ms_per_token(engine: LLMEngine, outputs: list[list[int]], schema: dict) -> float:
    """Mean time the engine's constraint calls take per output token: the allowed tokens and
    the forced ones in the state before each token, replayed through fresh constraints."""
    seconds, tokens = 0.0, 0
    for token_ids in outputs:
        constraint = engine.grammars.constraint(StructuredOutput(json_schema=schema))
        for token in token_ids:
            start = time.perf_counter()
            constraint.allowed([[]], engine.vocab_size)
            constraint.forced()
            seconds += time.perf_counter() - start
            constraint.accept(token)
        tokens += len(token_ids)
    return seconds / tokens * 1e3


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


def main() -> int:
    args = parse_args()
    schema = {**SCHEMA, "x-guidance": {"whitespace_flexible": False}} if args.compact else SCHEMA
    plain = LLM()
    speculative = LLM(speculative=SpeculativeConfig(method="hybrid"), control=ControlConfig(policy="auto"))
    engines = {"constrained": plain.engine, "forced": plain.engine, "forced+hybrid": speculative.engine}
    prompts = [plain.engine.apply_chat_template([{"role": "user", "content": f"Describe this person as JSON: {p}"}])
               for p in PEOPLE[: args.prompts]]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tqdm(total=args.rounds * len(prompts) * len(MODES), desc="requests") as bar:
        for round_ in range(args.rounds):
            for i, prompt in enumerate(prompts):
                for mode in MODES if (round_ + i) % 2 == 0 else reversed(MODES):
                    runs[mode].append({"prompt": i, **run_mode(engines[mode], mode, prompt, args.max_new_tokens, schema)})
                    bar.update(1)

    summary = {}
    for mode, done in runs.items():
        tokens, seconds, steps = (sum(r[k] for r in done) for k in ("tokens", "seconds", "steps"))
        summary[mode] = {
            "tokens_per_s": tokens / seconds,
            "tokens_per_step": tokens / steps,  # prefill steps included
            "forced_share": sum(r["drafted_accepted"] for r in done) / tokens if mode == "forced" else None,
            "valid_json": sum(valid(r["text"]) for r in done) / len(done),
        }
    base = summary["constrained"]["tokens_per_s"]
    for mode in MODES:
        summary[mode]["speedup_vs_constrained"] = summary[mode]["tokens_per_s"] / base
    identical = all([r["token_ids"] for r in runs[mode]] == [r["token_ids"] for r in runs["constrained"]]
                    for mode in MODES)
    constrained = runs["constrained"]
    mask_ms = constraint_ms_per_token(plain.engine, [r["token_ids"] for r in constrained], schema)
    token_ms = sum(r["seconds"] for r in constrained) / sum(r["tokens"] for r in constrained) * 1e3

    print("| mode | tokens/s | vs constrained | tokens/step | forced share | valid JSON |\n|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        s = summary[mode]
        share = "" if s["forced_share"] is None else f"{s['forced_share']:.0%}"
        print(f"| {mode} | {s['tokens_per_s']:.1f} | {s['speedup_vs_constrained']:.2f}x | {s['tokens_per_step']:.2f} "
              f"| {share} | {s['valid_json']:.0%} |")
    print(f"\noutputs identical across modes: {identical}; the constraint costs {mask_ms:.3f} ms a token "
          f"({mask_ms / token_ms:.1%} of a constrained token's {token_ms:.1f} ms)")
    report = {"summary": summary, "identical_outputs": identical, "constraint_ms_per_token": mask_ms,
              "constrained_ms_per_token": token_ms, "schema": schema, "runs": runs}
    Path(args.json).write_text(json.dumps(report, indent=2))
    plot(summary, Path(args.json).with_suffix(".png"))
    plain.shutdown()
    speculative.shutdown()
    return 0 if identical else 1


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [summary[mode]["tokens_per_s"] for mode in MODES]
    bars = ax.bar(MODES, values, color=["#4c72b0", "#55a868", "#c44e52"])
    for bar, mode in zip(bars, MODES):
        ax.annotate(f"{summary[mode]['speedup_vs_constrained']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom")
    ax.margins(y=0.12)
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("JSON-schema output on the default model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
