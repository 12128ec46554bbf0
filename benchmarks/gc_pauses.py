"""Python's garbage collector and the engine: step times with the startup heap frozen or not.

An engine process holds hundreds of thousands of long-lived objects (modules, the model, the
tokenizer); every full collection walks them all, stalling the step it lands in. The Serve
replica freezes its heap after start-up (``gc.freeze()``) so that collections skip them. This
runs the same decode load on the in-process engine (greedy, cumulative outputs as a server
streams them) with and without the freeze, each in its own process, in alternating rounds, and
prints the step-time distribution of each and what one full collection costs. By default the
model is a tiny random one (``random_model.py --shape tiny``) at 256 requests: a step as cheap
as a GPU's, where the host's pauses show; ``--model DIR`` takes another.

    python benchmarks/gc_pauses.py --json OUT.json [--model DIR] [--requests N] [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ["collected", "frozen"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", default=None, help="model directory (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    return parser.parse_args()


def measure(mode: str, model: str, requests: int, steps: int) -> dict:
    from specserve.config import EngineConfig
    from specserve.engine.llm_engine import LLMEngine
    from specserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, dtype="float32", max_num_seqs=requests, max_model_len=512,
                                    max_num_batched_tokens=max(512, 16 * requests)))
    start = time.perf_counter()
    gc.collect()
    full_collection_ms = (time.perf_counter() - start) * 1e3
    if mode == "frozen":
        gc.freeze()
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(requests):
        engine.add_request(engine.make_request(f"r{i}", [5 + i % 50, 7, 9, 11, 13, 17, 19, 23], params))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    engine.shutdown()
    return {"step_ms": times[3:], "full_collection_ms": full_collection_ms, "objects": len(gc.get_objects())}


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"mean_ms": statistics.mean(ordered), "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[int(len(ordered) * 0.99)], "max_ms": ordered[-1]}


def main() -> int:
    args = parse_args()
    if args.run:
        print(json.dumps(measure(args.run, args.model, args.requests, args.steps)))
        return 0
    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="gc-pauses-model-")
        subprocess.run([sys.executable, str(Path(__file__).with_name("random_model.py")), "--shape", "tiny",
                        "--out", model], check=True, capture_output=True)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else reversed(MODES):
            done = subprocess.run(
                [sys.executable, __file__, "--json", args.json, "--run", mode, "--model", model,
                 "--requests", str(args.requests), "--steps", str(args.steps)], capture_output=True, text=True,
                check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {mode} done", file=sys.stderr)
    report = {mode: {**summary([t for run in runs[mode] for t in run["step_ms"]]),
                     "full_collection_ms": statistics.mean(run["full_collection_ms"] for run in runs[mode]),
                     "objects": runs[mode][0]["objects"]} for mode in MODES}
    print("| heap | mean step | p50 | p99 | max |\n|---|---:|---:|---:|---:|")
    for mode in MODES:
        r = report[mode]
        print(f"| {mode} | {r['mean_ms']:.1f} ms | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    c, f = report["collected"], report["frozen"]
    print(f"\none full collection of the started engine's heap ({c['objects']} objects): "
          f"{c['full_collection_ms']:.0f} ms; frozen/collected: max step {f['max_ms'] / c['max_ms']:.2f}x, "
          f"p99 {f['p99_ms'] / c['p99_ms']:.2f}x, mean {f['mean_ms'] / c['mean_ms']:.2f}x")
    Path(args.json).write_text(json.dumps({"model": args.model or "random tiny", "requests": args.requests,
                                           "steps": args.steps, "rounds": args.rounds, **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
