"""Rotary position embeddings (RoPE), including `linear` and `llama3` scaling.

Data flow:
  1. `inverse_frequencies(config)` computes the per-pair rotation speeds once,
     on the host, exactly as Hugging Face does (float32), scaled per
     `config.rope_scaling`.
  2. `apply_rope(x, positions, inv_freq)` rotates queries or keys by their
     *global* positions, so a token rotates the same way whichever device or
     ring step it is computed on.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from loong_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 rotation speeds."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    )
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the
    # band in between interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [tokens, heads, head_dim] by positions [tokens] (half-split layout)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [tokens, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # [tokens, 1, head_dim]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
