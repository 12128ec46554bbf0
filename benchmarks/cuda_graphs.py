"""Forward-step latency with and without CUDA graphs, side by side in one run (needs a GPU).

Times the model runner's step for decode batches and small token trees on a target and,
optionally, a draft model; eager and graphed measurements alternate round by round so drift
hits both alike. Random-weight models of real shapes do (the shapes set the cost):

    python benchmarks/random_model.py --shape llama8b --out /tmp/llama8b
    python benchmarks/random_model.py --shape llama1b --out /tmp/llama1b
    python benchmarks/cuda_graphs.py --model /tmp/llama8b --draft-model /tmp/llama1b --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import EngineConfig
from specserve.control.profiler import measure
from specserve.distributed.parallel_state import SINGLE_PROCESS
from specserve.engine.model_runner import ModelRunner
from specserve.models.forward_batch import SequenceSlice

# (sequences, new tokens per sequence): decode batches, then draft frontiers / token trees.
SHAPES = [(1, 1), (4, 1), (16, 1), (64, 1), (1, 4), (1, 8), (8, 4), (16, 8)]


def step(rows: int, per_row: int, context: int) -> list[SequenceSlice]:
    """``rows`` sequences behind ``context`` cached tokens, each feeding ``per_row`` causal tokens."""
    return [
        SequenceSlice(
            slot=row,
            token_ids=[(row + k) % 97 for k in range(per_row)],
            positions=list(range(context, context + per_row)),
            cache_start=context,
            logits_at=list(range(per_row)),
        )
        for row in range(rows)
    ]


@contextmanager
def eager(runner: ModelRunner) -> Iterator[None]:
    graphs, runner.graphs = runner.graphs, None
    try:
        yield
    finally:
        runner.graphs = graphs


def compare(runner: ModelRunner, label: str, context: int, rounds: int, repeats: int) -> list[dict]:
    rows = []
    for sequences, per_row in tqdm(SHAPES, desc=label, unit="shape"):
        slices = step(sequences, per_row, context)
        if runner.graphs.bucket(slices) is None:
            continue
        eager_ms, graph_ms = [], []
        for _ in range(rounds):
            with eager(runner):
                eager_ms.append(measure(runner.forward, slices, repeats))
            graph_ms.append(measure(runner.forward, slices, repeats))
        e, g = statistics.median(eager_ms), statistics.median(graph_ms)
        rows.append({"model": label, "sequences": sequences, "tokens_per_sequence": per_row,
                     "eager_ms": round(e, 3), "graph_ms": round(g, 3), "speedup": round(e / g, 3)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--draft-model", default=None, help="draft model directory")
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="steps timed per round (median)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("CUDA graphs need a CUDA device")
    widest = max(s for s, _ in SHAPES)
    results = []
    for label, path in (("target", args.model), ("draft", args.draft_model)):
        if path is None:
            continue
        config = EngineConfig(model=path, max_num_seqs=widest, max_model_len=args.context + 64)
        runner = ModelRunner(config, Path(path), SINGLE_PROCESS)
        results += compare(runner, label, args.context, args.rounds, args.repeats)
        del runner
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, context {args.context}\n")
    print("| model | sequences x tokens | eager ms | graph ms | speedup |\n|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['sequences']} x {r['tokens_per_sequence']} | {r['eager_ms']:.2f} "
              f"| {r['graph_ms']:.2f} | {r['speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "context": args.context,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
