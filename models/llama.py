"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2).

Data flow of `LlamaForCausalLM.__call__` for a packed token stream:
  1. tokens [T] -> embeddings [T, hidden].
  2. Each decoder layer: RMSNorm -> q, k, v projections (GQA, optional bias)
     -> RoPE by *global* positions -> `attention(layer, q, k, v, positions,
     segment_ids, kv_cache)` (a function passed in: dense by default, ring
     prefill or distributed decode when sharded) -> o_proj -> residual ->
     RMSNorm -> SwiGLU MLP -> residual.
     With `config.scan_layers` (the default) the layers' weights are stacked
     on a leading [layers] axis and the layers run as one `jax.lax.scan`
     carrying (x, kv_cache): the program holds one layer's code whatever the
     depth, and `layer` reaches the hook as an int32 scalar tracer. Without
     it the layers are separate modules run by a Python loop (`layer` a
     static int), one copy of the code per layer.
  3. Final RMSNorm; logits [N, vocab] in float32 for the rows in
     `logits_indices` (all rows when None), so a prefill computes the LM head
     only for the tokens it samples from.

Parameters carry *logical* axis names (`PARAM_LOGICAL_AXES`, plus a leading
"layers" axis for stacked layer weights: `logical_axes`); the sharding package
maps them to mesh axes with a small table, so the model itself never mentions
devices.
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


LAYERS_AXIS = "layers"  # the leading axis of stacked layer weights (`ModelConfig.scan_layers`)


def is_stacked(path: tuple[Any, ...]) -> bool:
    """Whether the parameter at an NNX state path holds every layer's weights on a leading axis:
    ('layers', 'mlp', 'up_proj', 'kernel') is stacked, ('layers', 3, 'mlp', 'up_proj', 'kernel') is not."""
    return len(path) > 1 and path[0] == "layers" and isinstance(path[1], str)


def logical_axes(path: tuple[Any, ...]) -> tuple[str | None, ...] | None:
    """Logical axes of the parameter at an NNX state path such as
    ('layers', 0, 'self_attn', 'q_proj', 'kernel'), or None for a non-parameter (the RoPE frequencies)."""
    names = [p for p in path if isinstance(p, str)]
    axes = PARAM_LOGICAL_AXES.get(tuple(names[-2:])) if len(names) >= 2 else None
    if axes is None:
        return None
    return (LAYERS_AXIS, *axes) if is_stacked(path) else axes


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
        if config.scan_layers:
            self.layers = _stacked_layers(config, rngs)  # one DecoderLayer, every weight [layers, ...]
        else:
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
        if self.config.scan_layers:
            x, kv_cache = self._scan_layers(x, positions, segment_ids, inv_freq, attention, kv_cache)
        else:
            for layer_index, layer in enumerate(self.layers):
                x, kv_cache = layer(layer_index, x, positions, segment_ids, inv_freq, attention, kv_cache)
        if logits_indices is not None:
            x = x[logits_indices]  # [N, hidden]
        return self.logits(self.norm(x)), kv_cache

    def _scan_layers(self, x, positions, segment_ids, inv_freq, attention, kv_cache):
        """Every layer as one scan step: xs are the stacked weights and the layer index [layers] int32."""
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, layer_input):
            x, kv_cache = carry
            weights, layer = layer_input
            x, kv_cache = nnx.merge(graphdef, weights)(layer, x, positions, segment_ids, inv_freq, attention,
                                                       kv_cache)
            return (x, kv_cache), None

        layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, kv_cache), _ = jax.lax.scan(one_layer, (x, kv_cache), (stacked, layers))
        return x, kv_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, hidden] -> [N, vocab] float32."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """`config.num_layers` decoder layers as one module whose weights carry a leading [layers] axis.

    The layers are initialised one after another from `rngs`, exactly as the unrolled model's are, then
    stacked: a seed gives the same weights whichever way the model runs its layers."""
    layers = [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *(nnx.state(layer) for layer in layers))
    return nnx.merge(graphdef, stacked)


def init_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (for tests and training from scratch)."""
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> LlamaForCausalLM:
    """The model's structure without allocating parameters (for loading)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
