"""How often a draft's next token is the target's, teacher-forced, on Spec-Bench and on template prompts.

The target answers greedily a few Spec-Bench questions per category and as many fresh template
prompts of the distiller (``specserve.distill.prompts``, with a seed the distiller does not use
by default); the draft then reads every prompt and answer, and at each answer position its top-1
next token is compared with the target's. An EAGLE head reads the target's features of the same
text, as it does at a tree's root. This is the acceptance of a greedy chain's first
drafted token without the engine in between. A draft that agrees far more on template prompts
than on Spec-Bench has learned its training templates rather than the target. Also reports the
share of answer tokens the draft's vocabulary holds (no draft proposes the others), the
agreement where the target itself is at least 90 % sure of its token (so that a gap between the
prompt sets cannot be put down to the target being less predictable on one of them), and how
often prompt lookup (hybrid drafting's other half, the engine's n-gram sizes) proposes the
target's token, alone and where the draft does not. Writes JSON and a PNG (agreement per
category, both prompt sets).

    python benchmarks/draft_agreement.py --json OUT.json [--draft DIR] [--per-category N]
        [--template-prompts N] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specbench import DEFAULT_QUESTIONS, load_questions  # noqa: E402

from specserve.config import SpeculativeConfig  # noqa: E402
from specserve.distill.eagle import load_head, shifted  # noqa: E402
from specserve.distill.prompts import chat_prompts  # noqa: E402
from specserve.engine.sampling_params import SamplingParams  # noqa: E402
from specserve.llm import LLM  # noqa: E402
from specserve.models.default_model import default_draft_dir, default_model_dir  # noqa: E402
from specserve.models.eagle import is_eagle_draft  # noqa: E402
from specserve.spec.draft_model import DraftVocabulary  # noqa: E402
from specserve.spec.ngram import NgramDrafter  # noqa: E402

TEMPLATE_SEED = 987  # the distiller's data seeds are 0, 1, ...
SURE = 0.9  # the target's probability of its own token above which a position counts as predictable

# (the target's features [1, T, hidden], draft ids [T]) -> the draft's next-token logits [T, draft vocabulary]
NextTokenLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_draft_logits(draft_dir: Path) -> NextTokenLogits:
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    return lambda _, draft_ids: draft(input_ids=draft_ids.unsqueeze(0)).logits[0]


def eagle_logits(draft_dir: Path) -> NextTokenLogits:
    """An EAGLE head reading the target's features at every position (each a tree root)."""
    head = load_head(draft_dir)
    return lambda features, draft_ids: head.logits(head(draft_ids.unsqueeze(0), shifted(features)))[0]


def answer(llm: LLM, prompts: list[tuple[str, str, str]], max_new_tokens: int) -> list[dict]:
    """The target's greedy answers to ``(id, category, text)`` prompts."""
    ids = [llm.engine.apply_chat_template([{"role": "user", "content": text}]) for _, _, text in prompts]
    outputs = llm.generate(ids, SamplingParams(max_tokens=max_new_tokens, temperature=0.0), use_tqdm=True)
    return [{"category": category, "prompt_ids": prompt_ids, "output_ids": out.output.token_ids}
            for (_, category, _), prompt_ids, out in zip(prompts, ids, outputs)]


def lookup_tokens(lookup: NgramDrafter, token_ids: list[int], start: int) -> list[int | None]:
    """Prompt lookup's first proposal (the most frequent next token of the longest matching
    n-gram, as hybrid drafting ranks them) before each of ``token_ids[start:]``."""
    proposals = []
    for end in range(start, len(token_ids)):
        continuations = [c[0] for c in lookup.continuations(token_ids[:end], 1, "sample") if c]
        proposals.append(Counter(continuations).most_common(1)[0][0] if continuations else None)
    lookup.release("sample")
    return proposals


@torch.no_grad()
def positions(draft: NextTokenLogits, target: LlamaForCausalLM, vocab: DraftVocabulary, lookup: NgramDrafter,
              sample: dict) -> dict[str, torch.Tensor]:
    """Per answer position: whether the draft's top-1 (never its unknown-token row) is the
    target's greedy token, whether the draft's vocabulary holds that token, whether the target
    was at least ``SURE`` of it, and whether prompt lookup proposed it."""
    token_ids = sample["prompt_ids"] + sample["output_ids"]
    target_ids = torch.tensor(token_ids)
    ids = vocab.to_draft[target_ids]
    start, count = len(sample["prompt_ids"]) - 1, len(sample["output_ids"])
    features = target.model(input_ids=target_ids.unsqueeze(0)).last_hidden_state  # one target forward for both
    logits = draft(features, ids)[start : start + count]
    answers = ids[start + 1 :]
    known = torch.ones(count, dtype=torch.bool)
    if vocab.unknown is not None:
        logits[:, vocab.unknown] = float("-inf")
        known = answers != vocab.unknown
    target_probs = target.lm_head(features[0, start : start + count]).softmax(-1)
    looked_up = lookup_tokens(lookup, token_ids, start + 1)
    return {
        "agree": logits.argmax(-1) == answers,
        "known": known,
        "sure": target_probs.gather(1, target_ids[start + 1 :, None])[:, 0] >= SURE,
        "lookup": torch.tensor([t == a for t, a in zip(looked_up, sample["output_ids"])]),
    }


def measure(rows: list[dict[str, torch.Tensor]]) -> dict:
    """The shares of ``positions``' rows, all of them concatenated."""
    agree, known, sure, lookup = (torch.cat([r[key] for r in rows]) for key in ("agree", "known", "sure", "lookup"))
    total = len(agree)
    return {
        "top1": agree.sum().item() / total,
        "in_vocabulary": known.sum().item() / total,
        "answer_tokens": total,
        "target_sure_share": sure.sum().item() / total,
        "top1_where_target_sure": (agree & sure).sum().item() / max(sure.sum().item(), 1),
        "lookup_top1": lookup.sum().item() / total,
        "draft_or_lookup_top1": (agree | lookup).sum().item() / total,
    }


def agreement(draft: NextTokenLogits, target: LlamaForCausalLM, vocab: DraftVocabulary, lookup: NgramDrafter,
              samples: list[dict]) -> dict:
    """``measure`` overall and per category."""
    by_category: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
    for sample in samples:
        by_category[sample["category"]].append(positions(draft, target, vocab, lookup, sample))
    return {"overall": measure([row for rows in by_category.values() for row in rows]),
            "per_category": {c: measure(rows) for c, rows in sorted(by_category.items())}}


def plot(results: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    categories = sorted({c for result in results.values() for c in result["per_category"]})
    offset = {"specbench": -0.2, "templates": 0.2}
    for name, result in results.items():
        shown = [i for i, c in enumerate(categories) if c in result["per_category"]]
        ax.bar([i + offset[name] for i in shown], [result["per_category"][categories[i]]["top1"] for i in shown],
               width=0.4, label=f"{name} (overall {result['overall']['top1']:.1%})")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel("draft top-1 = target top-1")
    ax.set_ylim(0, 1)
    ax.set_title("Teacher-forced draft/target agreement on the target's greedy answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--draft", type=Path, default=None, help="a draft model directory (default: the embedded one)")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--per-category", type=int, default=2, help="Spec-Bench questions per category")
    parser.add_argument("--template-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    draft_dir = args.draft or default_draft_dir()
    if not args.questions.is_file():
        parser.error(f"{args.questions} not found")
    if not (draft_dir / "config.json").is_file():
        parser.error(f"{draft_dir} is not a model directory")
    if min(args.per_category, args.template_prompts, args.max_new_tokens) < 1:
        parser.error("--per-category, --template-prompts and --max-new-tokens must be at least 1")

    llm = LLM(device="cpu", max_num_seqs=32)
    questions = load_questions(args.questions, args.per_category)
    prompt_sets = {
        "specbench": [(str(q["question_id"]), q["category"], q["turns"][0]) for q in questions],
        "templates": [(p.prompt_id, p.category, p.text) for p in chat_prompts(args.template_prompts, TEMPLATE_SEED)],
    }
    samples = {name: answer(llm, prompts, args.max_new_tokens) for name, prompts in prompt_sets.items()}
    target_vocab = llm.engine.vocab_size
    llm.shutdown()

    target = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    draft = eagle_logits(draft_dir) if is_eagle_draft(draft_dir) else model_draft_logits(draft_dir)
    draft_vocab = json.loads((draft_dir / "config.json").read_text())["vocab_size"]
    vocab = DraftVocabulary.load(draft_dir, draft_vocab, target_vocab)
    defaults = SpeculativeConfig()
    lookup = NgramDrafter(defaults.ngram_min, defaults.ngram_max)
    results = {name: agreement(draft, target, vocab, lookup, group) for name, group in samples.items()}

    print(f"| prompts | answer tokens | in draft vocabulary | draft top-1 = target top-1 | same where the target "
          f"is {SURE:.0%} sure (share of tokens) | prompt lookup's top-1 | draft's or lookup's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        o = result["overall"]
        print(f"| {name} | {o['answer_tokens']} | {o['in_vocabulary']:.1%} | {o['top1']:.1%} | "
              f"{o['top1_where_target_sure']:.1%} ({o['target_sure_share']:.0%}) | {o['lookup_top1']:.1%} | "
              f"{o['draft_or_lookup_top1']:.1%} |")
    report = {"draft": str(draft_dir), "per_category": args.per_category, "template_prompts": args.template_prompts,
              "template_seed": TEMPLATE_SEED, "max_new_tokens": args.max_new_tokens, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(results, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
