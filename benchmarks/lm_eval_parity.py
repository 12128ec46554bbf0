"""lm-evaluation-harness against the served model: the same scores as transformers in-process.

Starts the application of ``configs/default.yaml`` (speculation on, as it serves) on free ports
and runs lm-evaluation-harness's ``local-completions`` model against its ``/v1/completions``
(token-id prompts in batches with ``echo``, ``logprobs`` and ``max_tokens``: what lm-eval sends
for log-likelihood and perplexity tasks; tokenized by the server's ``/tokenize``), then lm-eval's own ``hf`` model (transformers,
float32) on the same checkpoint, over the tasks in ``benchmarks/lm_eval/`` (small
multiple-choice, perplexity and greedy-generation tasks written for SpecServe; no dataset
download). Prints both runs' task metrics, how far apart every request's log-likelihood is, and
how many greedy generations are identical.

    pip install "lm-eval[api]"
    python benchmarks/lm_eval_parity.py --json OUT.json [--tasks specserve_mc,specserve_text,specserve_gen]
        [--batch-size 16] [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, load_app, start_app, stop_app  # noqa: E402

from specserve.models.default_model import default_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "benchmarks" / "lm_eval"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tasks", default="specserve_mc,specserve_text,specserve_gen",
                        help="comma-separated lm-eval task names (those in benchmarks/lm_eval/ or lm-eval's own)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per request (and per hf batch)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    return parser.parse_args()


def evaluate(model: str, model_args: dict, tasks: list[str], batch_size: int) -> dict:
    """lm-eval's results for one model: task metrics and logged samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, batch_size=batch_size, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )


def metrics(results: dict, task: str) -> dict[str, float]:
    return {name.split(",")[0]: value for name, value in results["results"][task].items()
            if isinstance(value, float) and "stderr" not in name}


def responses(results: dict, task: str) -> dict[tuple[int, int], object]:
    """(doc, request) -> lm-eval's response: a generated text, a (log-likelihood, is greedy)
    pair, or a rolling log-likelihood."""
    return {(sample["doc_id"], i): resp for sample in results["samples"][task]
            for i, (resp,) in enumerate(sample["resps"])}


def main() -> int:
    args = parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print('this benchmark needs lm-evaluation-harness: pip install "lm-eval[api]"', file=sys.stderr)
        return 2
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # the tasks read local files only
        os.environ.setdefault(flag, "1")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.chdir(REPO)  # the task files name their data relative to the repository
    tasks = args.tasks.split(",")

    serve_config, config = load_app(args.config, None)
    model_path = Path(config.engine.model or default_model_dir())
    model_name = config.model_name or model_path.name
    http_port = free_port()
    start_app(serve_config, http_port, free_port())
    try:
        served = evaluate("local-completions", {
            "model": model_name, "base_url": f"http://127.0.0.1:{http_port}/v1/completions",
            "tokenizer_backend": "remote", "tokenized_requests": True,  # the server's /tokenize
            "max_retries": 1,
        }, tasks, args.batch_size)
    finally:
        stop_app()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = evaluate("hf", {"pretrained": str(model_path), "dtype": "float32", "device": device},
                         tasks, args.batch_size)

    report: dict = {"model": model_name, "config": os.path.relpath(args.config, REPO), "tasks": {}}
    diffs, greedy_pairs, texts_equal = [], [], []
    print("| task | metric | served | hf (transformers) |\n|---|---|---:|---:|")
    for task in tasks:
        ours, theirs = metrics(served, task), metrics(reference, task)
        report["tasks"][task] = {"served": ours, "hf": theirs}
        for name in ours:
            print(f"| {task} | {name} | {ours[name]:.4f} | {theirs[name]:.4f} |")
        mine, ref = responses(served, task), responses(reference, task)
        if mine.keys() != ref.keys():
            raise SystemExit(f"{task}: the two runs logged different requests")
        for key, ours_resp in mine.items():
            theirs_resp = ref[key]
            if isinstance(ours_resp, str):
                texts_equal.append(ours_resp == theirs_resp)
            elif isinstance(ours_resp, (list, tuple)):
                diffs.append(abs(float(ours_resp[0]) - float(theirs_resp[0])))
                greedy_pairs.append((ours_resp[1], theirs_resp[1]))
            else:
                diffs.append(abs(float(ours_resp) - float(theirs_resp)))
    greedy_agree = sum(a == b for a, b in greedy_pairs)
    report.update(
        loglikelihoods=len(diffs),
        max_abs_diff=max(diffs, default=None),
        mean_abs_diff=sum(diffs) / len(diffs) if diffs else None,
        is_greedy_agreement=greedy_agree / len(greedy_pairs) if greedy_pairs else None,
        generations=len(texts_equal),
        generations_identical=sum(texts_equal),
    )
    if diffs:
        print(f"\n{len(diffs)} log-likelihoods: max |served - hf| {max(diffs):.2e}, mean "
              f"{report['mean_abs_diff']:.2e}; is_greedy agrees on {greedy_agree}/{len(greedy_pairs)}")
    if texts_equal:
        print(f"{len(texts_equal)} greedy generations: {sum(texts_equal)} identical to transformers'")
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
