"""Parity of the Flax model, loaded from safetensors, with `transformers` on the same files."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.generate import generate
from loong_jax.models.loading import load_hf_checkpoint
from tests.models.tiny_hf import FAMILIES, build_hf_model, hf_greedy, hf_logits, save_hf_model

PROMPT_LEN = 64
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    """(family, transformers model, checkpoint dir, loaded Flax model, config) built once per family."""
    hf_model = build_hf_model(request.param)
    path = save_hf_model(hf_model, tmp_path_factory.mktemp(request.param))
    model, config = load_hf_checkpoint(path)
    return request.param, hf_model, path, model, config


def _prompt(seed: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=length).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, params, tokens, positions, segment_ids, logits_indices):
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, segment_ids, logits_indices=logits_indices)
    return logits


def _packed_forward(model, tokens, positions, segment_ids, logits_indices=None) -> np.ndarray:
    """[T or N, vocab] logits of a packed stream (jitted: op-by-op dispatch is slower than a compile)."""
    graphdef, params = nnx.split(model)
    indices = None if logits_indices is None else jnp.asarray(logits_indices, jnp.int32)
    return np.asarray(_jit_forward(graphdef, params, jnp.asarray(tokens, jnp.int32),
                                   jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32),
                                   indices))


def _forward(model, token_ids) -> np.ndarray:
    n = len(token_ids)
    return _packed_forward(model, token_ids, np.arange(n), np.zeros(n))


def test_config_maps_family_fields(family_checkpoint):
    family, hf_model, _, _, config = family_checkpoint
    assert config.num_kv_heads == 2 and config.num_heads == 4 and config.head_dim == 16
    assert config.tie_word_embeddings == (family == "tied_bias")
    assert config.qkv_bias == (family in ("qwen2_bias", "tied_bias"))
    assert config.o_bias == config.mlp_bias == (family == "tied_bias")
    expected_rope = {"llama3_rope": "llama3", "linear_rope": "linear"}.get(family)
    assert (config.rope_scaling.rope_type if config.rope_scaling else None) == expected_rope
    assert config.rms_norm_eps == hf_model.config.rms_norm_eps


def test_logits_match_transformers(family_checkpoint):
    _, hf_model, _, model, config = family_checkpoint
    prompt = _prompt(1, PROMPT_LEN, config.vocab_size)
    ours = _forward(model, prompt)
    reference = hf_logits(hf_model, prompt).numpy()
    assert np.abs(reference).max() > 1.0, "logits too flat for a meaningful comparison"
    assert np.abs(ours - reference).max() <= 1e-4


def test_greedy_continuation_matches_transformers(family_checkpoint):
    _, hf_model, _, model, config = family_checkpoint
    prompt = _prompt(2, PROMPT_LEN, config.vocab_size)
    ours = generate(model, prompt.tolist(), NEW_TOKENS, eos_token_ids=config.eos_token_ids)
    reference = hf_greedy(hf_model, prompt.tolist(), NEW_TOKENS)
    assert len(ours.tokens) == NEW_TOKENS and ours.finish_reason == "length"
    assert ours.tokens == reference


def test_packed_stream_equals_prompts_alone(family_checkpoint):
    _, _, _, model, config = family_checkpoint
    lengths = (23, 9, 30)  # + 2 padding tokens = PROMPT_LEN, so the packed stream reuses one compile
    prompts = [_prompt(10 + i, n, config.vocab_size) for i, n in enumerate(lengths)]
    padding = PROMPT_LEN - sum(lengths)
    tokens = np.concatenate(prompts + [np.zeros(padding, np.int32)])
    positions = np.concatenate([np.arange(len(p)) for p in prompts] + [np.zeros(padding)])
    segments = np.concatenate([np.full(len(p), i) for i, p in enumerate(prompts)] + [np.full(padding, -1)])
    packed = _packed_forward(model, tokens, positions, segments)
    start = 0
    for prompt in prompts:
        # Each prompt alone in a 32-token stream; the tail is padding (segment -1) that it cannot see.
        alone_len = 32
        alone_tokens = np.zeros(alone_len, np.int32)
        alone_tokens[:len(prompt)] = prompt
        alone_segments = np.where(np.arange(alone_len) < len(prompt), 0, -1)
        alone = _packed_forward(model, alone_tokens, np.arange(alone_len), alone_segments)[:len(prompt)]
        np.testing.assert_allclose(packed[start:start + len(prompt)], alone, rtol=0, atol=1e-4)
        start += len(prompt)
    assert np.isfinite(packed[start:]).all()  # padding rows see nothing and must not produce NaN


def test_logits_indices_select_rows(family_checkpoint):
    _, _, _, model, config = family_checkpoint
    prompt = _prompt(1, PROMPT_LEN, config.vocab_size)
    rows = np.array([PROMPT_LEN - 1, 0, 17], np.int32)
    picked = _packed_forward(model, prompt, np.arange(PROMPT_LEN), np.zeros(PROMPT_LEN), rows)
    np.testing.assert_allclose(picked, _forward(model, prompt)[rows], rtol=0, atol=1e-5)
