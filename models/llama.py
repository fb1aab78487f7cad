"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2).

Data flow of `LlamaForCausalLM.__call__` for a packed token stream:
  1. tokens [T] -> embeddings [T, hidden].
  2. Each decoder layer: RMSNorm -> q, k, v projections (GQA, optional bias)
     -> RoPE by *global* positions -> `attention(layer, q, k, v, positions,
     segment_ids, kv_cache)` (a function passed in: dense by default, ring
     prefill or distributed decode when sharded) -> o_proj -> residual ->
     RMSNorm -> SwiGLU MLP -> residual.
  3. Final RMSNorm; logits [N, vocab] in float32 for the rows in
     `logits_indices` (all rows when None), so a prefill computes the LM head
     only for the tokens it samples from.

Parameters carry *logical* axis names (`PARAM_LOGICAL_AXES`); the sharding
package maps them to mesh axes with a small table, so the model itself never
mentions devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loong_jax.models.attention import AttentionFn, dense_attention
from loong_jax.models.config import ModelConfig
from loong_jax.models.rope import apply_rope, inverse_frequencies

# Logical axes of each parameter, keyed by (module name, parameter name).
PARAM_LOGICAL_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("q_proj", "kernel"): ("embed", "q_heads"),
    ("q_proj", "bias"): ("q_heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("down_proj", "bias"): ("embed",),
    ("input_layernorm", "scale"): ("embed",),
    ("post_attention_layernorm", "scale"): ("embed",),
    ("norm", "scale"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def logical_axes(path: tuple[Any, ...]) -> tuple[str | None, ...]:
    """Logical axes of the parameter at an NNX state path such as
    ('layers', 0, 'self_attn', 'q_proj', 'kernel')."""
    names = [p for p in path if isinstance(p, str)]
    return PARAM_LOGICAL_AXES[(names[-2], names[-1])]


class RMSNorm(nnx.Module):
    """Hugging Face's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale[...] * normed


def _linear(din: int, dout: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dtype = config, config.jnp_dtype
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dtype, rngs)

    def __call__(self, layer: int, x, positions, segment_ids, inv_freq, attention: AttentionFn, kv_cache):
        tokens = x.shape[0]
        q = self.q_proj(x).reshape(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(tokens, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, kv_cache = attention(layer, q, k, v, positions, segment_ids, kv_cache)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim)), kv_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dtype = config, config.jnp_dtype
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = config.jnp_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                                                rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, layer, x, positions, segment_ids, inv_freq, attention, kv_cache):
        attn_out, kv_cache = self.self_attn(layer, self.input_layernorm(x), positions, segment_ids,
                                            inv_freq, attention, kv_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class LlamaForCausalLM(nnx.Module):
    """The whole decoder. Parameter paths mirror Hugging Face names
    (`embed_tokens`, `layers[i].self_attn.q_proj`, `norm`, `lm_head`) so that
    loading is a rename plus a transpose."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = config.jnp_dtype
        self.config = config
        self.inv_freq = nnx.Variable(jnp.asarray(inverse_frequencies(config)))  # [head_dim/2], not a Param
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=dtype, embedding_init=nnx.initializers.normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

    def __call__(
        self,
        tokens: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32, global position in its sequence
        segment_ids: jax.Array,  # [T] int32, -1 for padding
        *,
        attention: AttentionFn = dense_attention,
        kv_cache: Any = None,
        logits_indices: jax.Array | None = None,  # [N] rows of the stream to score
    ) -> tuple[jax.Array, Any]:
        x = self.embed_tokens(tokens)  # [T, hidden]
        inv_freq = self.inv_freq[...]
        for layer_index, layer in enumerate(self.layers):
            x, kv_cache = layer(layer_index, x, positions, segment_ids, inv_freq, attention, kv_cache)
        if logits_indices is not None:
            x = x[logits_indices]  # [N, hidden]
        return self.logits(self.norm(x)), kv_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, hidden] -> [N, vocab] float32."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)


def init_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (for tests and training from scratch)."""
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> LlamaForCausalLM:
    """The model's structure without allocating parameters (for loading)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
