"""Where a large decode step's time goes: the target forward against the engine's host work, and
the operators inside, on any device.

Fills ``--batch`` KV slots with random prompts (greedy, top-``--logprobs`` log-probabilities, as
``specserve distill`` asks), prefills them, then times ``--steps`` decode steps, splitting each
into the executor's forward call and everything else the engine does on the host, and profiles a
few more with ``torch.profiler`` (operators by self time on the device, or on the CPU without
one). Made for short GPU leases: one command says whether a slow step is kernels or Python.

    python benchmarks/step_profile.py --json OUT.json [--model DIR] [--device cuda] [--dtype D]
        [--batch N] [--prompt-tokens N] [--steps N] [--logprobs K] [--trace TRACE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--model", default=None, help="target directory (default: the embedded default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64, help="requests decoding together")
    parser.add_argument("--prompt-tokens", type=int, default=200,
                        help="mean prompt length (each drawn from half to one and a half times it)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    parser.add_argument("--profiled-steps", type=int, default=3)
    parser.add_argument("--logprobs", type=int, default=20, help="top log-probabilities per token (-1: none)")
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace of the profiled steps")
    return parser.parse_args()


class TimedExecutor:
    """Wraps the engine's executor call and adds up the time spent in it."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = 0.0
        self._call = engine.executor.call
        self._sync = torch.cuda.synchronize if engine.config.torch_device().type == "cuda" else (lambda: None)
        engine.executor.call = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._call(*args, **kwargs)
        self._sync()  # the forward's kernels count here, not in whatever syncs next
        self.seconds += time.perf_counter() - start
        return out


def fill(engine: LLMEngine, args: argparse.Namespace) -> None:
    """``--batch`` requests, prefilled, each with room for every step to come."""
    rng = random.Random(0)
    logprobs = None if args.logprobs < 0 else args.logprobs
    params = SamplingParams(max_tokens=args.steps + args.profiled_steps + 4, temperature=0.0, ignore_eos=True,
                            logprobs=logprobs, output_kind="final_only")
    vocab = engine.vocab_size
    for i in range(args.batch):
        length = max(1, int(args.prompt_tokens * rng.uniform(0.5, 1.5)))
        engine.add_request(engine.make_request(f"p{i}", [rng.randrange(10, vocab) for _ in range(length)], params))
    while engine.scheduler.has_prompts:
        engine.step()


def main() -> int:
    args = parse_args()
    engine = LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
        max_model_len=int(args.prompt_tokens * 1.5) + args.steps + args.profiled_steps + 16,
        max_num_batched_tokens=max(512, 2 * args.batch),
    ))
    fill(engine, args)
    engine.step()  # a first decode step of this shape (a CUDA graph is captured on first use)
    timed = TimedExecutor(engine)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = (time.perf_counter() - start) / args.steps
    forward = timed.seconds / args.steps
    device, dtype = engine.config.torch_device(), engine.config.torch_dtype()
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profiled_steps):
            engine.step()
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
    top = sorted(prof.key_averages(), key=lambda e: -getattr(e, sort_by))[:15]
    result = {
        "device": str(device), "dtype": str(dtype), "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "logprobs": args.logprobs,
        "step_ms": 1e3 * wall, "forward_ms": 1e3 * forward, "host_ms": 1e3 * (wall - forward),
        "tokens_per_s": args.batch / wall,
        "top_ops": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, sort_by) / 1e3 / args.profiled_steps}
                    for e in top],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table)
    print(f"{args.batch} requests on {device} ({dtype}): {result['step_ms']:.1f} ms a step "
          f"({result['forward_ms']:.1f} in the forward call, {result['host_ms']:.1f} on the host), "
          f"{result['tokens_per_s']:.0f} tokens/s")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
