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
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: run every step eagerly")
    parser.add_argument("--speculative", choices=["draft", "ngram", "hybrid"], default=None,
                        help="speculative decoding with the distilled draft model, n-gram lookup, or both")
    parser.add_argument("--draft-model", default=None, help="draft model directory (default: the distilled default draft)")
    parser.add_argument("--draft-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"],
                        help="the draft model's dtype (auto: int8 on a CPU, else the engine's); "
                        "changes the drafts, never the output")
    parser.add_argument("--depth", type=int, default=4, help="token-tree depth (speculation length)")
    parser.add_argument("--width", type=int, default=1, help="children kept per tree depth (1: a chain)")
    parser.add_argument("--max-nodes", type=int, default=None, help="tree nodes verified per step")
    parser.add_argument("--policy", default="auto",
                        choices=["none", "fixed", "smartspec", "specserve", "adaserve", "auto"],
                        help="how much to speculate each step (auto: as much as predicted goodput pays)")
    parser.add_argument("--profile", default=None, help="saved cost profile (default: cached, measured on first use)")


def _engine_config(args: argparse.Namespace, **overrides):
    from specserve.config import ControlConfig, EngineConfig

    return EngineConfig(
        model=args.model,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        speculative=_speculative_config(args),
        control=ControlConfig(policy=args.policy, profile=args.profile),
        **overrides,
    )


def _speculative_config(args: argparse.Namespace):
    from specserve.config import SpeculativeConfig
    from specserve.spec.tree import TreeBudget

    if args.speculative is None:
        return None
    budget = TreeBudget(depth=args.depth, width=args.width, max_nodes=args.max_nodes)
    return SpeculativeConfig(
        method=args.speculative, draft_model=args.draft_model, draft_dtype=args.draft_dtype, budget=budget
    )


def _structured_output(args: argparse.Namespace):
    """The constraint of ``--json-schema`` (JSON text or a file holding it), ``--regex`` or
    ``--choice``; None without one."""
    import json
    from pathlib import Path

    from specserve.engine.sampling_params import StructuredOutput

    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()  # FileNotFoundError: a CLI message
        try:
            return StructuredOutput(json_schema=json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema is not valid JSON: {exc}") from None
    if args.regex is not None:
        return StructuredOutput(regex=args.regex)
    if args.choice:
        return StructuredOutput(choice=args.choice)
    return None


def _generate(args: argparse.Namespace) -> int:
    from specserve.engine.llm_engine import LLMEngine
    from specserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        structured=_structured_output(args),
    )
    engine = LLMEngine(_engine_config(args, max_num_seqs=1))
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
            spec = output.spec_stats
            mat = f", MAT {spec.mean_accepted_tokens:.2f}" if spec is not None else ""
            print(
                f"[{len(output.output.token_ids)} tokens, finish={output.output.finish_reason.value}, "
                f"TTFT {m.ttft * 1000:.1f} ms, TPOT {tpot}{mat}]",
                file=sys.stderr,
            )
    finally:
        engine.shutdown()
    return 0


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specserve.engine.llm_engine import LLMEngine

    args.policy, args.profile = "fixed", None  # profiling needs no cost model of its own
    if args.speculative is None:
        args.speculative = "draft"
    engine = LLMEngine(
        _engine_config(args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    )
    try:
        cost = engine.profile(quick=args.quick)
        path = Path(args.out).expanduser() if args.out else engine.profile_path()
        cost.save(path)
    finally:
        engine.shutdown()
    for name, table in (("target", cost.target), ("draft", cost.draft)):
        if table is None:
            continue
        print(f"{name} forward latency (ms); rows: context, columns: tokens in the step")
        print("context " + " ".join(f"{t:>7}" for t in table.tokens))
        for context, row in zip(table.contexts, table.ms):
            print(f"{context:>7} " + " ".join(f"{ms:7.1f}" for ms in row))
    print(f"profile written to {path}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specserve.config import EngineConfig
    from specserve.distill.corpus import CorpusError, read_passages
    from specserve.distill.data import DataConfig, generate_dataset, read_samples
    from specserve.distill.eagle import EagleTrainConfig, train_eagle
    from specserve.distill.train import TrainConfig, train_draft
    from specserve.engine.llm_engine import LLMEngine
    from specserve.models.default_model import default_model_dir
    from specserve.spec.draft_model import VOCAB_FILE

    if args.out is None and args.stage != "data":
        print("error: --out is required unless --stage data", file=sys.stderr)
        return 2
    # Checked before the data stage, which can run for hours.
    init = Path(args.init).expanduser() if args.init else None
    if init is not None and args.method == "eagle":
        print("error: --init continues a model draft; it does not apply to --method eagle", file=sys.stderr)
        return 2
    if init is not None and not (init / VOCAB_FILE).is_file():
        print(f"error: {init} is not a draft written by specserve distill (no {VOCAB_FILE})", file=sys.stderr)
        return 2
    passages = None
    if args.documents and args.stage != "train":
        try:
            passages = read_passages(Path(args.documents).expanduser())
        except (OSError, CorpusError) as e:
            print(f"error: --documents: {e}", file=sys.stderr)
            return 2
    work = Path(args.work).expanduser()
    # A step's token budget leaves room for prefill chunks beside a full batch of decodes.
    engine_config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch_size,
                                 max_num_batched_tokens=max(512, 2 * args.batch_size))
    if args.stage != "train":
        engine = LLMEngine(engine_config)
        try:
            data = DataConfig(
                num_prompts=args.num_prompts,
                num_documents=args.num_documents,
                num_self_prompts=args.num_self_prompts,
                max_new_tokens=args.max_new_tokens,
                document_tokens=args.document_tokens,
                batch_size=args.batch_size,
                seed=args.seed,
                num_corpus_documents=args.num_corpus_documents,
            )
            generate_dataset(engine, work, data, passages)
        finally:
            engine.shutdown()
        if args.stage == "data":
            return 0
    target_path = Path(args.model) if args.model else default_model_dir()
    samples = list(read_samples(work))
    if not samples:
        print(f"error: no training data in {work}; run the data stage first", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    if args.method == "eagle":
        epochs = {"epochs": args.epochs} if args.epochs else {}
        config = EagleTrainConfig(
            vocab_size=args.draft_vocab, layers=tuple(args.layers), lr=args.lr, seed=args.seed,
            device=str(engine_config.torch_device()), max_seconds=args.max_train_seconds, **epochs,
        )
        summary = train_eagle(samples, target_path, work, out, config)
    else:
        train = TrainConfig(
            layers=tuple(args.layers),
            vocab_size=args.draft_vocab,
            epochs=args.epochs or TrainConfig.epochs,
            batch_tokens=args.batch_tokens,
            lr=args.lr,
            seed=args.seed,
            device=str(engine_config.torch_device()),
            max_seconds=args.max_train_seconds,
            init=init,
        )
        summary = train_draft(samples, target_path, out, train)
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"draft written to {args.out}")
    return 0


def _client(args: argparse.Namespace) -> int:
    """Send one prompt to a running server over HTTP (OpenAI API) or gRPC and print the reply."""
    slo = {k: v for k, v in {"slo_class": args.slo_class, "tpot_slo_ms": args.tpot_slo_ms,
                             "ttft_slo_ms": args.ttft_slo_ms}.items() if v is not None}
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    prompt = None if args.chat else args.prompt
    if args.protocol == "grpc":
        import grpc

        from specserve.deployments.client import SpecServeClient

        try:
            with SpecServeClient(args.grpc_target) as client:
                params = dict(max_tokens=args.max_tokens, temperature=args.temperature, **slo)
                if args.stream:
                    for reply in client.stream(prompt, messages, **params):
                        print(reply.text, end="", flush=True)
                    print()
                else:
                    reply = client.generate(prompt, messages, **params)
                    print(reply.text)
        except grpc.RpcError as exc:
            print(f"specserve: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        stats = {"finish_reason": reply.finish_reason, "ttft_ms": reply.stats.ttft_ms,
                 "tpot_ms": reply.stats.tpot_ms, "slo_attained": reply.stats.slo_attained}
    else:
        import openai

        client = openai.OpenAI(base_url=args.url, api_key="none")
        params = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                      extra_body=slo, stream=args.stream)
        try:
            params["model"] = args.model_name or client.models.list().data[0].id
            if args.chat:
                reply = client.chat.completions.create(messages=messages, **params)
            else:
                reply = client.completions.create(prompt=prompt, **params)
            stats = _print_http_reply(reply, args.chat, args.stream)
        except openai.APIStatusError as exc:
            print(f"specserve: error: HTTP {exc.status_code}: {exc.message}", file=sys.stderr)
            return 2
        except openai.APIConnectionError as exc:
            print(f"specserve: error: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 2
    if args.stats:
        print(stats, file=sys.stderr)
    return 0


def _print_http_reply(reply, chat: bool, stream: bool) -> dict:
    """Print an OpenAI reply (or stream of chunks); returns its SpecServe stats."""
    if not stream:
        choice = reply.choices[0]
        print(choice.message.content if chat else choice.text)
        return (reply.model_extra or {}).get("specserve", {})
    stats = {}
    for chunk in reply:
        if chunk.choices:
            choice = chunk.choices[0]
            print((choice.delta.content if chat else choice.text) or "", end="", flush=True)
        stats = (chunk.model_extra or {}).get("specserve") or stats
    print()
    return stats


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
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="vLLM's; 1 is none, 1.1-1.3 curbs loops")
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None,
                            help="the output is JSON matching this schema (JSON text or a file)")
    constraint.add_argument("--regex", default=None, help="the output matches this regular expression")
    constraint.add_argument("--choice", action="append", default=[], help="the output is one of these (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print token count, TTFT and TPOT to stderr")
    _add_engine_args(gen)
    gen.set_defaults(handler=_generate)

    profile = commands.add_parser(
        "profile", help="measure the target's and the draft's forward latency for the cost model"
    )
    _add_engine_args(profile)
    profile.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step at most")
    profile.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step at most")
    profile.add_argument("--quick", action="store_true", help="a coarser grid (what engines measure at start-up)")
    profile.add_argument("--out", default=None, help="where to write the JSON (default: the engine's profile cache)")
    profile.set_defaults(handler=_profile)

    distill = commands.add_parser(
        "distill", help="make training data with the target and distill a small draft model"
    )
    distill.add_argument("--out", default=None, help="directory for the trained draft (HF format)")
    distill.add_argument("--work", default="~/.cache/specserve/distill", help="training data directory (resumable)")
    distill.add_argument("--model", default=None, help="target model directory (default: the embedded default)")
    distill.add_argument("--device", default="auto", help="where the target answers and the draft trains")
    distill.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="precision the target answers in (the draft learns its distributions)")
    distill.add_argument("--stage", choices=["all", "data", "train"], default="all",
                         help="make the data, train on what --work holds, or both")
    distill.add_argument("--num-prompts", type=int, default=1200)
    distill.add_argument("--num-documents", type=int, default=150, help="long-context documents to write and reuse")
    distill.add_argument("--num-self-prompts", type=int, default=0,
                         help="user turns the target writes itself (Magpie) and then answers")
    distill.add_argument("--documents", default=None, metavar="JSONL",
                         help='outside documents to summarize, extract from and reply to ({"text": ...} per line)')
    distill.add_argument("--num-corpus-documents", type=int, default=300,
                         help="passages of --documents asked about per seed")
    distill.add_argument("--max-new-tokens", type=int, default=192)
    distill.add_argument("--document-tokens", type=int, default=320, help="length of each written document")
    distill.add_argument("--batch-size", type=int, default=32, help="concurrent requests while generating data")
    distill.add_argument("--method", choices=["model", "eagle"], default="model",
                         help="model: a small standalone LM (the committed default draft); eagle: a head over the target's features")
    distill.add_argument("--layers", type=int, nargs="+", default=[0, 1], help="target layers the draft starts from")
    distill.add_argument("--init", default=None, metavar="DRAFT",
                         help="train this draft further (model method; its layers and vocabulary are kept)")
    distill.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size (incl. the unknown row)")
    distill.add_argument("--epochs", type=int, default=None, help="training epochs (default: 4 for eagle, 8 for model)")
    distill.add_argument("--lr", type=float, default=1e-3)
    distill.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per training batch (model)")
    distill.add_argument("--max-train-seconds", type=float, default=None,
                         help="stop training after this long; the learning-rate schedule ends with it")
    distill.add_argument("--seed", type=int, default=0)
    distill.set_defaults(handler=_distill)

    client = commands.add_parser("client", help="send a prompt to a running server (HTTP or gRPC)")
    client.add_argument("prompt")
    client.add_argument("--chat", action="store_true", help="send it as a chat message")
    client.add_argument("--protocol", choices=["http", "grpc"], default="http")
    client.add_argument("--url", default="http://localhost:8000/v1", help="OpenAI API base URL")
    client.add_argument("--grpc-target", default="localhost:9000")
    client.add_argument("--model-name", default=None, help="the served model's name (HTTP; default: the one served)")
    client.add_argument("--stream", action="store_true")
    client.add_argument("--max-tokens", type=int, default=128)
    client.add_argument("--temperature", type=float, default=0.0)
    client.add_argument("--slo-class", default=None, help="a named SLO class of the server")
    client.add_argument("--tpot-slo-ms", type=float, default=None)
    client.add_argument("--ttft-slo-ms", type=float, default=None)
    client.add_argument("--stats", action="store_true", help="print latency and SLO stats to stderr")
    client.set_defaults(handler=_client)
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
