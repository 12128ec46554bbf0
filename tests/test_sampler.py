"""Sampling transforms and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from specserve.engine.detokenizer import IncrementalDetokenizer, text_decoder
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


def test_text_decoder_decodes_as_the_tokenizer_does(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = [tok.bos_token_id] + tok.encode("hello world, the end", add_special_tokens=False) + [tok.eos_token_id]
    assert text_decoder(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
    assert not tok.clean_up_tokenization_spaces
    assert text_decoder(tok).func == tok.backend_tokenizer.decode  # no clean-up: straight to Rust
    tok.clean_up_tokenization_spaces = True
    try:
        assert text_decoder(tok).func == tok.decode  # transformers' clean-up applies: its own decode
    finally:
        tok.clean_up_tokenization_spaces = False


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
