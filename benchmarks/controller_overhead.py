"""Controller overhead: the SLO controller's per-iteration decisions as a share of the iteration.

Keeps 32 requests decoding at once (a closed batch: 64 requests through 32 slots) under every
speculation policy, and reports the seconds the controller spent deciding (plan, prompt cap,
keep-drafting, select, observe) per iteration and as a fraction of the iteration time:

* on the real engine here (the default pair, draft trees of depth 4 and width 2), the iteration
  time is the measured wall time of ``engine.step()``;
* in the simulator on a GPU-class cost profile (default: A100 / Llama-3.1-70B / TP4), where the
  iteration time is the profile's and the decisions are timed on this CPU: the run of median
  decision time of ``--repeats`` identical (deterministic) runs, as one run moves with the
  machine's noise.

    python benchmarks/controller_overhead.py --json OUT.json [--quick] [--profile PROFILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.control.controller import SLOController
from specserve.control.cost_model import CostModel
from specserve.control.policies import POLICIES
from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator
from specserve.control.slo import SLO
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.tree import TreeBudget

CONCURRENCY = 32
BUDGET = TreeBudget(depth=4, width=2)
A100_PROFILE = Path(__file__).resolve().parent / "profiles" / "a100-llama70b-tp4.json"
QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench" / "dev.jsonl"


def engine_overhead(engine: LLMEngine, controller: SLOController, prompts: list[list[int]], max_tokens: int) -> dict:
    """Serve ``2 * CONCURRENCY`` requests through ``CONCURRENCY`` slots under ``controller``."""
    engine.controller = controller
    for i in range(2 * CONCURRENCY):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, slo_class="chat")
        engine.add_request(engine.make_request(f"{controller.policy.name}-{i}", prompts[i % len(prompts)], params))
    decided, step_s, steps = controller.decision_seconds, 0.0, 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step_s += time.perf_counter() - start
        steps += 1
    decision_s = controller.decision_seconds - decided
    return {"iterations": steps, "decision_ms_per_iteration": 1e3 * decision_s / steps,
            "iteration_ms": 1e3 * step_s / steps, "overhead": decision_s / step_s}


def simulated_overhead(policy: str, cost: CostModel) -> dict:
    """The same closed batch in the simulator: decisions timed here, iterations from the profile."""
    simulator = Simulator(SimConfig(policy=policy, max_budget=BUDGET, max_num_seqs=CONCURRENCY), cost,
                          AcceptanceModel(mean_confidence=0.7))
    requests = [SimRequest(f"r{i}", 200, 256, SLO(tpot_ms=60, ttft_ms=5000), 0.0) for i in range(2 * CONCURRENCY)]
    simulator.run(requests, progress=False)
    decision_s = simulator.controller.decision_seconds
    return {"iterations": simulator.iterations,
            "decision_ms_per_iteration": 1e3 * decision_s / simulator.iterations,
            "iteration_ms": 1e3 * simulator.busy_s / simulator.iterations,
            "overhead": decision_s / simulator.busy_s}


def table(title: str, rows: dict[str, dict]) -> str:
    lines = [f"**{title}**", "", "| policy | iterations | decision ms / iteration | iteration ms | overhead |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['iterations']} | {r['decision_ms_per_iteration']:.3f} | {r['iteration_ms']:.1f} | "
              f"{100 * r['overhead']:.2f}% |" for name, r in rows.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="16 new tokens per request instead of 48")
    parser.add_argument("--profile", type=Path, default=A100_PROFILE, help="cost profile of the simulated runs")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=5, help="simulated runs per policy (the median is reported)")
    args = parser.parse_args()
    if not args.profile.is_file():
        parser.error(f"profile {args.profile} not found")
    if not QUESTIONS.is_file():
        parser.error(f"questions {QUESTIONS} not found")

    cost = CostModel.load(args.profile)
    simulated = {}
    for name in tqdm(args.policies, desc="simulated"):
        runs = sorted((simulated_overhead(name, cost) for _ in range(args.repeats)), key=lambda r: r["overhead"])
        simulated[name] = runs[len(runs) // 2]

    config = EngineConfig(max_num_seqs=CONCURRENCY, max_model_len=1024,
                          speculative=SpeculativeConfig(method="draft", budget=BUDGET),
                          control=ControlConfig(policy="auto"))
    engine = LLMEngine(config)
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    prompts = [engine.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    prompts = [p for p in prompts if len(p) <= 256]
    max_tokens = 16 if args.quick else 48
    real = {}
    for name in tqdm(args.policies, desc="engine"):
        controller = SLOController(name, engine.controller.cost.profile, config.max_num_batched_tokens)
        real[name] = engine_overhead(engine, controller, prompts, max_tokens)
    engine.shutdown()

    print(table(f"Real engine, {CONCURRENCY} concurrent requests (this CPU)", real))
    print()
    print(table(f"Simulated, {CONCURRENCY} concurrent requests ({cost.model} on {cost.device})", simulated))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"concurrency": CONCURRENCY, "engine": real, "simulated": simulated,
                                     "profile": str(args.profile)}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
