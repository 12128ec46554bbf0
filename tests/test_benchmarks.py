"""Every benchmark script starts and explains itself (they are run by hand, so nothing else would
notice an import that a refactor broke)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_every_script_is_found():
    assert {"specbench.py", "replay.py", "serving.py", "serving_closed.py", "draft_agreement.py"} <= {
        p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_prints_its_usage(script: Path):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ")


def test_the_replay_prompts_are_the_questions_first_turns_shuffled_and_those_that_fit(tmp_path: Path):
    """replay.py, serving.py and simulate.py --questions share them."""
    import json

    sys.path.insert(0, str(BENCHMARKS))
    from policy_report import chat_prompts

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"turns": ["q" * n, "second turn"]}) + "\n" for n in (3, 10, 5, 4)))

    def template(messages: list[dict[str, str]]) -> list[int]:
        assert [m["role"] for m in messages] == ["user"]
        return [ord(c) for c in messages[0]["content"]]

    prompts = chat_prompts(template, questions, max_len=6, seed=0)
    assert sorted(map(len, prompts)) == [3, 4, 5]
    assert prompts == chat_prompts(template, questions, max_len=6, seed=0)
    with pytest.raises(ValueError, match="no question"):
        chat_prompts(template, questions, max_len=2, seed=0)
