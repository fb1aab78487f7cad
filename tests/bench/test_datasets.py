"""Benchmark requests: synthetic lengths scaled and clipped, exact token counts, ShareGPT and JSONL files."""

import json

import numpy as np
import pytest

from loong_jax.bench.datasets import (Vocabulary, jsonl_requests, scale_lengths, sharegpt_requests,
                                      synthetic_requests)
from loong_jax.simulator.workloads import sample_lengths

VOCAB = Vocabulary(64, frozenset({0, 1, 2}))


def word_tokenize(value):
    """A stand-in for the server's Tokenize call: one token per word (chat: per word of every message)."""
    text = value if isinstance(value, str) else " ".join(m["content"] for m in value)
    return [3 + len(word) for word in text.split()]


def test_synthetic_lengths_are_the_simulators_scaled():
    requests = synthetic_requests("mixed", 30, VOCAB, length_scale=0.01, seed=5)
    length_rng = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[0])
    inputs, outputs = sample_lengths("mixed", 30, length_rng)
    assert [r.input_len for r in requests] == np.maximum(1, np.rint(inputs * 0.01)).astype(int).tolist()
    assert [r.output_len for r in requests] == np.maximum(1, np.rint(outputs * 0.01)).astype(int).tolist()
    ids = np.concatenate([r.prompt_token_ids for r in requests])
    assert ids.min() >= 3 and ids.max() < 64  # never a special id
    assert requests == synthetic_requests("mixed", 30, VOCAB, length_scale=0.01, seed=5)


def test_clipping_keeps_requests_inside_the_context():
    inputs, outputs = scale_lengths(np.array([5000, 10, 300]), np.array([100, 900, 20]), 1.0, max_total_len=512)
    assert (inputs + outputs <= 512).all()
    assert outputs.tolist() == [100, 256, 20] and inputs.tolist() == [412, 10, 300]
    with pytest.raises(ValueError):
        scale_lengths(np.array([1]), np.array([1]), 0.0, None)


def test_sharegpt_file(tmp_path):
    conversations = [
        {"conversations": [{"from": "human", "value": "tell me about the ring attention please"},
                           {"from": "gpt", "value": "it passes blocks of keys round a ring of devices"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there how are you"}]},
        {"conversations": [{"from": "human", "value": "only one turn here"}]},
        "not a conversation",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    requests = sharegpt_requests(path, 10, word_tokenize, seed=0)
    assert len(requests) == 1  # "hi" is under 4 tokens, the one-turn entry and the string are skipped
    assert requests[0].input_len == 7 and requests[0].output_len == 10
    fixed = sharegpt_requests(path, 10, word_tokenize, fixed_output_len=5)
    assert fixed[0].output_len == 5
    with pytest.raises(ValueError, match="no usable"):
        sharegpt_requests(path, 10, word_tokenize, max_total_len=8)


def test_jsonl_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "a b c", "output_len": 4}),
        json.dumps({"prompt_token_ids": [5, 6], "max_tokens": 2}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "x y"}], "output_len": 1}),
    ]))
    requests = jsonl_requests(path, None, word_tokenize)
    assert [(r.input_len, r.output_len) for r in requests] == [(3, 4), (2, 2), (2, 1)]
    assert requests[1].prompt_token_ids == (5, 6)
    assert len(jsonl_requests(path, 2, word_tokenize)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_requests(bad, None, word_tokenize)
    with pytest.raises(ValueError, match="exceed"):
        jsonl_requests(path, None, word_tokenize, max_total_len=5)
