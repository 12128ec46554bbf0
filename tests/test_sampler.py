"""Sampling transforms and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from specserve.engine import detokenizer
from specserve.engine.detokenizer import DecodingTextStream, IncrementalDetokenizer, RustTextStream, text_stream
from specserve.engine.sampler import draw, sample, target_probs, top_logprobs
from specserve.engine.sampling_params import SamplingParams


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = target_probs(logits, [SamplingParams(top_k=2)])
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = target_probs(logits, [SamplingParams(top_p=0.8)])  # 0.5 + 0.3 reaches 0.8
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = target_probs(logits, [SamplingParams(top_p=0.81)])
    assert (probs[0, :3] > 0).all() and probs[0, 3] == 0


def test_temperature_sharpens_and_greedy_is_argmax():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    cold = target_probs(logits, [SamplingParams(temperature=0.1)])
    assert cold[0, 1] > 0.99
    assert sample(logits, [SamplingParams(temperature=0)], [None]) == [1]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams()], [gen])[0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_each_row_draws_from_its_own_distribution_with_its_own_generator():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.9, 0.0, 0.0, 0.0, 0.1]])
    draws = [draw(probs, [torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)]) for s in range(4000)]
    first, second = (torch.bincount(torch.tensor(col), minlength=5) / 4000 for col in zip(*draws))
    assert first[[0, 2, 4]].sum() == 0 and second[1:4].sum() == 0  # never a token of mass 0
    assert abs(first[1] - 0.5) < 0.03 and abs(second[0] - 0.9) < 0.02
    seeded = [torch.Generator().manual_seed(7) for _ in range(2)]
    assert draw(probs[:1], seeded[:1]) == draw(probs[:1], seeded[1:])  # a seed fixes the draw


def test_incremental_detokenization_equals_full_decode(tiny_engine):
    tok = tiny_engine.tokenizer
    text = "Hello world! Speculative decoding, ünïcödé and emoji 🚀 too."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:", add_special_tokens=False), [], False)
    streamed = ""
    for token in ids:
        detok.add(token)
        streamed += detok.take_new_text(finished=False)
        assert "\ufffd" not in streamed
    assert streamed == tok.decode(ids)


@pytest.mark.parametrize("clean_up", [False, True])
def test_a_text_stream_continues_its_context_as_a_full_decode_does(tiny_engine, clean_up):
    tok = tiny_engine.tokenizer
    ids = tok.encode("Prompt: hello world, ünïcödé and 🚀 to the end", add_special_tokens=False)
    ids.append(tok.eos_token_id)  # a special token adds no text
    assert not tok.clean_up_tokenization_spaces
    tok.clean_up_tokenization_spaces = clean_up
    try:
        stream = text_stream(tok, ids[:3])
        # Transformers' clean-up needs its own decode; otherwise one Rust call a token.
        assert isinstance(stream, DecodingTextStream if clean_up else RustTextStream)
        text = "".join(stream(token) for token in ids[3:])
        assert tok.decode(ids[:3], skip_special_tokens=True) + text == tok.decode(ids, skip_special_tokens=True)
    finally:
        tok.clean_up_tokenization_spaces = False


def test_text_decodes_through_transformers_where_tokenizers_cannot_stream_from_ids(tiny_engine, monkeypatch):
    monkeypatch.setattr(detokenizer, "DecodeStream", None)  # tokenizers < 0.22
    assert isinstance(text_stream(tiny_engine.tokenizer, [1]), DecodingTextStream)


def test_stop_string_is_cut_and_never_streamed(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1], ["fox jumps"], include_stop=False)
    streamed = ""
    for token in ids:
        detok.add(token)
        streamed += detok.take_new_text(finished=bool(detok.stopped_by))
        if detok.stopped_by:
            break
    assert detok.stopped_by == "fox jumps"
    assert streamed == "The quick brown "


def test_top_logprobs_include_chosen_token_and_are_sorted():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    rows = top_logprobs(logits, tokens=[0, 0], counts=[2, 0])
    expected = logits.log_softmax(-1)
    assert list(rows[0]) == [1, 3, 0]  # top-2 by probability, then the chosen token
    assert rows[0][1] == pytest.approx(expected[0, 1].item())
    assert rows[1] == {0: pytest.approx(expected[1, 0].item())}
