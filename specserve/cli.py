"""``specserve`` command line."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None)


def _generate(args: argparse.Namespace) -> int:
    from specserve.config import EngineConfig
    from specserve.engine.llm_engine import LLMEngine
    from specserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    config = EngineConfig(
        model=args.model,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=1,
    )
    engine = LLMEngine(config)
    try:
        prompt = (
            engine.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat
            else args.prompt
        )
        engine.add_request(engine.make_request("cli", prompt, params))
        output = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                sys.stdout.write(output.output.delta_text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if output is not None and output.error:
            raise RuntimeError(output.error)
        if args.stats and output is not None:
            m = output.metrics
            tpot = f"{m.tpot * 1000:.1f} ms" if m.tpot is not None else "n/a"
            print(
                f"[{len(output.output.token_ids)} tokens, finish={output.output.finish_reason.value}, "
                f"TTFT {m.ttft * 1000:.1f} ms, TPOT {tpot}]",
                file=sys.stderr,
            )
    finally:
        engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="SLO-aware LLM serving with speculative decoding")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete a prompt and print the result")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print token count, TTFT and TPOT to stderr")
    _add_engine_args(gen)
    gen.set_defaults(handler=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        print(f"specserve: error: {details}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
