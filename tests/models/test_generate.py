"""The reference generate loop: cache consistency, sampling filters, stopping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.attention import dense_attention
from loong_jax.models.generate import (PREFILL_BUCKET, ContiguousKVCache, contiguous_cache_attention,
                                       generate, sample_token)
from loong_jax.models.loading import load_hf_checkpoint
from tests.models.tiny_hf import build_hf_model, save_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf_model(build_hf_model("llama3_rope", seed=11), tmp_path_factory.mktemp("gen"))
    return load_hf_checkpoint(path)[0]


@nnx.jit
def _full_logits(model, tokens):
    n = tokens.shape[0]
    return model(tokens, jnp.arange(n, dtype=jnp.int32), jnp.zeros((n,), jnp.int32))[0]


def test_cached_logits_equal_a_full_forward(model):
    """Every step's logits (prefill with padding, then one token at a time) equal a
    full forward over prompt + generated tokens."""
    prompt = np.random.default_rng(0).integers(0, 128, size=PREFILL_BUCKET + 5).tolist()
    result = generate(model, prompt, 12, return_logits=True)
    assert result.logits.shape == (12, 128)
    full = np.asarray(_full_logits(model, jnp.asarray(prompt + result.tokens, jnp.int32)))
    np.testing.assert_allclose(result.logits, full[len(prompt) - 1:-1], rtol=0, atol=1e-4)
    assert result.tokens == full[len(prompt) - 1:-1].argmax(-1).tolist()


_cache_attention = jax.jit(contiguous_cache_attention, static_argnums=0)


def test_cache_attention_equals_dense_attention():
    rng = np.random.default_rng(1)
    tokens, kv_heads, q_heads, head_dim, max_len = 10, 2, 4, 8, 16
    q = jnp.asarray(rng.normal(size=(tokens, q_heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(tokens, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(tokens, kv_heads, head_dim)), jnp.float32)
    positions = jnp.arange(tokens, dtype=jnp.int32)
    segments = jnp.zeros((tokens,), jnp.int32)
    expected, _ = jax.jit(dense_attention, static_argnums=0)(0, q, k, v, positions, segments, None)
    shape = (2, max_len, kv_heads, head_dim)
    cache = ContiguousKVCache(jnp.zeros(shape), jnp.zeros(shape))
    # prefill 7 tokens (+3 padding rows), then 3 single-token steps
    pad = jnp.concatenate([jnp.arange(7), jnp.full((3,), -1)]).astype(jnp.int32)
    out, cache = _cache_attention(1, q, k, v, positions, jnp.where(pad >= 0, 0, -1), cache)
    np.testing.assert_allclose(np.asarray(out[:7]), np.asarray(expected[:7]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[7:]), 0.0)  # padding queries see nothing
    assert not np.asarray(cache.keys[1, 7:]).any() and not np.asarray(cache.keys[0]).any()
    for t in range(7, tokens):
        sl = slice(t, t + 1)
        out, cache = _cache_attention(1, q[sl], k[sl], v[sl], positions[sl], segments[sl], cache)
        np.testing.assert_allclose(np.asarray(out[0]), np.asarray(expected[t]), atol=1e-5)


_sample_many = jax.jit(jax.vmap(sample_token, in_axes=(None, 0, None, None, None)))


def _samples(logits, temperature, top_k, top_p, n=4000) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(_sample_many(jnp.asarray(logits, jnp.float32), keys, jnp.float32(temperature),
                                   jnp.int32(top_k), jnp.float32(top_p)))


PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
LOGITS = np.log(PROBS)


def test_greedy_and_degenerate_filters_pick_the_argmax():
    assert set(_samples(LOGITS, 0.0, 0, 1.0, n=8)) == {1}
    assert set(_samples(LOGITS, 1.5, 1, 1.0)) == {1}  # top_k = 1
    assert set(_samples(LOGITS, 1.5, 0, 1e-6)) == {1}  # top_p ~ 0 keeps the most likely token


def test_unfiltered_sampling_follows_softmax():
    frequencies = np.bincount(_samples(LOGITS, 1.0, 0, 1.0), minlength=5) / 4000
    np.testing.assert_allclose(frequencies, PROBS, atol=0.03)
    hot = np.bincount(_samples(LOGITS, 2.0, 0, 1.0), minlength=5) / 4000
    expected_hot = PROBS ** 0.5 / (PROBS ** 0.5).sum()
    np.testing.assert_allclose(hot, expected_hot, atol=0.03)


def test_top_k_and_top_p_restrict_the_support():
    top3 = np.bincount(_samples(LOGITS, 1.0, 3, 1.0), minlength=5) / 4000
    assert top3[0] == top3[2] == 0
    np.testing.assert_allclose(top3[[1, 3, 4]], PROBS[[1, 3, 4]] / 0.85, atol=0.03)
    # top_p = 0.5: 0.4 alone is short of 0.5, so 0.3 joins; nothing else
    nucleus = np.bincount(_samples(LOGITS, 1.0, 0, 0.5), minlength=5) / 4000
    assert set(np.nonzero(nucleus)[0]) == {1, 3}
    np.testing.assert_allclose(nucleus[[1, 3]], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)


def test_sampling_is_reproducible_per_seed(model):
    prompt = list(range(20))
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95)
    first = generate(model, prompt, 10, seed=1, **kwargs).tokens
    assert generate(model, prompt, 10, seed=1, **kwargs).tokens == first
    assert any(generate(model, prompt, 10, seed=s, **kwargs).tokens != first for s in (2, 3))


def test_stops_on_eos(model):
    prompt = list(range(5, 30))
    greedy = generate(model, prompt, 10).tokens
    stopper = greedy[4]
    stopped = generate(model, prompt, 10, eos_token_ids=[999, stopper])
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == greedy[:greedy.index(stopper) + 1]


def test_rejects_bad_lengths(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(model, list(range(250)), 7)
