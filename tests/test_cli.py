"""The command line: a completion on a tiny model, and clear errors for bad input."""

from __future__ import annotations

import re

import pytest

from specserve.cli import main


def test_generate_prints_a_completion(tiny_model, capsys):
    assert main(["generate", "Hello world", "--model", str(tiny_model), "--max-tokens", "8", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "TTFT" in captured.err


def test_penalties_change_the_greedy_completion(tiny_model, capsys):
    argv = ["generate", "Hello world", "--model", str(tiny_model), "--max-tokens", "16", "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--frequency-penalty", "2", "--repetition-penalty", "1.5"]) == 0
    assert capsys.readouterr().out != plain


def test_generate_with_a_json_schema_a_regex_or_choices(tiny_model, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                      '"additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}')
    base = ["generate", "Hello", "--model", str(tiny_model), "--max-tokens", "32"]
    assert main(base + ["--json-schema", str(schema)]) == 0
    assert capsys.readouterr().out.strip() in ('{"ok":true}', '{"ok":false}')
    assert main(base + ["--regex", "[a-z]{2,5}!"]) == 0
    assert re.fullmatch("[a-z]{2,5}!", capsys.readouterr().out.strip())
    assert main(base + ["--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")


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
        (["generate", "hi", "--max-tokens", "-1"], "max_tokens"),
        (["generate", "hi", "--max-tokens", "100000"], "exceeds the model context"),
        (["generate", "hi", "--model", "/no/such/dir"], "not a directory"),
        (["generate", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
        (["generate", "hi", "--regex", "(unclosed"], "unclosed group"),
        (["generate", "hi", "--json-schema", "{not json"], "--json-schema is not valid JSON"),
        (["generate", "hi", "--json-schema", "/no/such/schema.json"], "No such file"),
    ],
)
def test_bad_input_exits_2_with_a_message(tiny_model, capsys, argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", str(tiny_model)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_profile_writes_a_cost_model(tiny_model, tmp_path, capsys):
    from specserve.control.cost_model import CostModel

    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(tiny_model), "--draft-model", str(tiny_model), "--quick",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "256", "--out", str(out)]
    assert main(argv) == 0
    cost = CostModel.load(out)
    assert cost.target.tokens == [1, 2, 4, 6, 8, 12, 16] and cost.draft is not None
    assert "target forward latency" in capsys.readouterr().out


def test_generate_with_an_adaptive_policy_and_a_saved_profile(tiny_model, tmp_path, capsys):
    from test_control import CHEAP_VERIFY

    CHEAP_VERIFY.save(tmp_path / "p.json")
    argv = ["generate", "Hello", "--model", str(tiny_model), "--max-tokens", "8", "--stats",
            "--speculative", "draft", "--draft-model", str(tiny_model), "--policy", "auto",
            "--profile", str(tmp_path / "p.json")]
    assert main(argv) == 0
    assert "MAT" in capsys.readouterr().err


def test_the_draft_dtype_flag_reaches_the_speculative_config(capsys):
    from specserve.cli import _speculative_config, build_parser

    args = build_parser().parse_args(["generate", "Hi", "--speculative", "draft", "--draft-dtype", "int8"])
    assert _speculative_config(args).draft_dtype == "int8"
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["generate", "Hi", "--speculative", "draft", "--draft-dtype", "int4"])
    assert stopped.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
