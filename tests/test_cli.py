"""The command line: a completion on a tiny model, and clear errors for bad input."""

from __future__ import annotations

import pytest

from specserve.cli import main


def test_generate_prints_a_completion(tiny_model, capsys):
    assert main(["generate", "Hello world", "--model", str(tiny_model), "--max-tokens", "8", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "TTFT" in captured.err


def test_chat_and_seeded_sampling_are_reproducible(tiny_model, capsys):
    argv = ["generate", "Hi", "--chat", "--model", str(tiny_model), "--max-tokens", "8",
            "--temperature", "0.8", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", ""], "prompt must not be empty"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--max-tokens", "100000"], "exceeds the model context"),
        (["generate", "hi", "--model", "/no/such/dir"], "not a directory"),
    ],
)
def test_bad_input_exits_2_with_a_message(tiny_model, capsys, argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", str(tiny_model)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
