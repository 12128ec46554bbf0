"""Tables and plots of policies compared across loads (shared by simulate.py and replay.py)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def chat_prompts(
    apply_chat_template: Callable[[list[dict[str, str]]], list[int]], path: Path, max_len: int, seed: int
) -> list[list[int]]:
    """Chat prompts of the questions' first turns (JSON lines with ``turns``), shuffled, those
    of at most ``max_len`` tokens."""
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(questions)
    prompts = [apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    prompts = [p for p in prompts if len(p) <= max_len]
    if not prompts:
        raise ValueError(f"no question of {path} fits in {max_len} tokens")
    return prompts


def parse_mix(text: str, known: set[str]) -> dict[str, float]:
    """``"interactive=0.4,chat=0.4,batch=0.2"`` as class -> weight (known classes, weights > 0)."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"unknown SLO class {name!r}; known: {sorted(known)}")
        mix[name] = float(weight)
        if mix[name] <= 0:
            raise ValueError(f"SLO class {name!r} needs a positive weight, got {weight!r}")
    return mix


COLUMNS = [
    ("slo_attainment", "attain", "{:.1%}"),
    ("ttft_attainment", "TTFT met", "{:.1%}"),
    ("tpot_attainment", "TPOT met", "{:.1%}"),
    ("goodput_tok_s", "goodput tok/s", "{:.1f}"),
    ("mean_ttft_ms", "TTFT ms", "{:.0f}"),
    ("mean_tpot_ms", "TPOT ms", "{:.1f}"),
    ("p99_tpot_ms", "p99 TPOT", "{:.1f}"),
    ("mat", "MAT", "{:.2f}"),
]


def markdown(loads: list[float], policies: dict[str, list[dict]], load_label: str = "req/s") -> str:
    """One row per (load, policy)."""
    lines = [
        f"| {load_label} | policy | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for i, load in enumerate(loads):
        for name, rows in policies.items():
            cells = [fmt.format(rows[i][key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {load:g} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(loads: list[float], policies: dict[str, list[dict]]) -> dict[str, float | bool]:
    """The issue's goals for ``auto``: never worse than any policy by more than 2 points; at
    the highest load 1.5x the attainment and 1.3x the goodput of the better of none and fixed;
    at the lowest load at most 0.6x the mean TPOT of none."""
    auto = policies["auto"]
    others = {name: rows for name, rows in policies.items() if name != "auto"}
    worst_gap = max(
        (rows[i]["slo_attainment"] - auto[i]["slo_attainment"] for rows in others.values() for i in range(len(loads))),
        default=0.0,
    )
    result: dict[str, float | bool] = {"max_attainment_gap_to_auto": worst_gap, "never_2_points_worse": worst_gap <= 0.02}
    baselines = [policies[n][-1] for n in ("none", "fixed") if n in policies]
    if baselines:
        best = max(baselines, key=lambda r: (r["slo_attainment"], r["goodput_tok_s"]))
        result["high_load_attainment_ratio"] = auto[-1]["slo_attainment"] / max(best["slo_attainment"], 1e-9)
        result["high_load_goodput_ratio"] = auto[-1]["goodput_tok_s"] / max(best["goodput_tok_s"], 1e-9)
    if "none" in policies:
        result["low_load_tpot_ratio"] = auto[0]["mean_tpot_ms"] / max(policies["none"][0]["mean_tpot_ms"], 1e-9)
    return result


def plot(loads: list[float], policies: dict[str, list[dict]], path: Path, title: str, load_label: str = "load (req/s)") -> None:
    """SLO attainment and goodput against load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_slo, ax_good) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in policies.items():
        style = dict(marker="o", lw=2.5 if name == "auto" else 1.2)
        ax_slo.plot(loads, [100 * r["slo_attainment"] for r in rows], label=name, **style)
        ax_good.plot(loads, [r["goodput_tok_s"] for r in rows], label=name, **style)
    ax_slo.set_ylabel("SLO attainment (%)")
    ax_good.set_ylabel("goodput (tokens/s of requests within SLO)")
    for ax in (ax_slo, ax_good):
        ax.set_xlabel(load_label)
        ax.grid(alpha=0.3)
    ax_good.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
