"""One layer's attention on the GPU, as the benchmark measures it (`benchmarks/gpu_h200.py`'s attention phase).

Data flow:
  1. Prefill of one causal prompt of T tokens ([T, heads, head_dim] bf16 q, k, v of the model's shape), three
     ways: the project's Pallas kernel (`models.kernels.prefill_attention.prefill_partial_attention`, out and
     LSE), cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`; XLA's on a CPU) and
     the current XLA path of every ring step (`models.blocked_attention.segment_attention`). Reported in
     TFLOP/s of useful work (the unmasked half) and as a share of the measured matmul ceiling.
  2. Decode over pages: `batch` requests of `context` tokens each in one member's pool of one layer, the
     engine's per-member call (`sharding.decode_attention._member_partials`) with the paged kernel or the XLA
     reference. Reported as KV bytes read per second and as a share of the measured copy bandwidth.
  Each case is compiled ahead of time (compile seconds recorded apart), then timed within the budget's cap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpu_accounting import Budget, attention_flops, compiled, decode_kv_bytes, guarded, timed
from loong_jax.models.blocked_attention import segment_attention
from loong_jax.models.config import ModelConfig
from loong_jax.models.kernels.prefill_attention import prefill_partial_attention
from loong_jax.scheduler.cost.roofline import TransformerShape
# The engine's per-member decode attention (reference or kernel by name), outside its shard_map.
from loong_jax.sharding.decode_attention import PAGES_PER_CHUNK, _member_partials

PREFILL_VARIANTS = ("kernel", "cudnn", "current")
DECODE_VARIANTS = ("kernel", "current")


def _prefill_function(variant: str, scale: float, kernel_impl: str):
    interpret = kernel_impl == "interpret"

    def kernel(q, k, v, positions, segments):
        return prefill_partial_attention(q, k, v, positions, segments, positions, segments, scale,
                                         interpret=interpret)

    def cudnn(q, k, v, positions, segments):
        del positions, segments  # one prompt at positions 0..T-1: the causal mask says it all
        implementation = "cudnn" if jax.default_backend() == "gpu" else None
        return jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                            implementation=implementation)[0]

    def current(q, k, v, positions, segments):
        return segment_attention(q, k, v, positions, segments, positions, segments, scale)

    return jax.jit({"kernel": kernel, "cudnn": cudnn, "current": current}[variant])


def prefill_case(config: ModelConfig, shape: TransformerShape, tokens: int, variant: str, kernel_impl: str,
                 matmul_tflops: float, budget: Budget, repeats: int, device) -> dict:
    keys = jax.random.split(jax.random.key(tokens), 3)
    q = jax.device_put(jax.random.normal(keys[0], (tokens, config.num_heads, config.head_dim), jnp.bfloat16), device)
    k, v = (jax.device_put(jax.random.normal(key, (tokens, config.num_kv_heads, config.head_dim), jnp.bfloat16),
                           device) for key in keys[1:])
    positions = jax.device_put(np.arange(tokens, dtype=np.int32), device)
    segments = jax.device_put(np.zeros(tokens, np.int32), device)
    args = (q, k, v, positions, segments)
    program, compile_s = compiled(_prefill_function(variant, config.head_dim ** -0.5, kernel_impl), *args)
    result = timed(lambda: program(*args), repeats, warmup=1, cap_s=budget.cap_s())
    tflops = attention_flops(shape, tokens) / result["seconds"] / 1e12
    return {**result, "compile_s": compile_s, "tflops": tflops, "matmul_fraction": tflops / matmul_tflops}


def decode_case(config: ModelConfig, shape: TransformerShape, batch: int, context: int, variant: str,
                kernel_impl: str, page_size: int, copy_gbs: float, budget: Budget, repeats: int, device) -> dict:
    """`batch` requests of `context` tokens, each on its own run of pages of a one-layer pool."""
    pages_per_request = -(-context // page_size)
    pages = batch * pages_per_request
    pool_shape = (1, 1, 2, pages, page_size, config.num_kv_heads, config.head_dim)
    pool = jax.device_put(jax.random.normal(jax.random.key(context), pool_shape, jnp.bfloat16), device)
    q = jax.device_put(jax.random.normal(jax.random.key(batch), (batch, config.num_heads, config.head_dim),
                                         jnp.bfloat16), device)
    held = np.full(pages_per_request, page_size, np.int32)
    held[-1] = context - (pages_per_request - 1) * page_size
    entry_rows = np.repeat(np.arange(batch, dtype=np.int32), pages_per_request)  # sorted by row
    entry_pages = np.arange(pages, dtype=np.int32)
    entry_tokens = np.tile(held, batch)
    args = (q, pool, *(jax.device_put(x, device) for x in (entry_rows, entry_pages, entry_tokens)))
    impl = kernel_impl if variant == "kernel" else "reference"
    function = jax.jit(lambda q, pool, rows, pages, tokens: _member_partials(
        q, pool, 0, rows, pages, tokens, config.head_dim ** -0.5, PAGES_PER_CHUNK, impl))
    program, compile_s = compiled(function, *args)
    result = timed(lambda: program(*args), repeats, warmup=1, cap_s=budget.cap_s())
    gbs = decode_kv_bytes(shape, batch, context) / result["seconds"] / 1e9
    return {**result, "compile_s": compile_s, "kv_gbs": gbs, "copy_fraction": gbs / copy_gbs}


def run_attention_phase(settings, shape: TransformerShape, ceilings: dict, kernel_impl: str, budget: Budget,
                        device, record) -> list[dict]:
    """Every prefill and decode case of `settings` that the budget allows; `record(row)` after each one."""
    rows = []
    config = settings.config
    for tokens in settings.attention_lengths:
        for variant in PREFILL_VARIANTS:
            row = {"kind": "attention_prefill", "tokens": tokens, "variant": variant}
            if variant == "current" and tokens not in settings.current_path_lengths:
                continue  # a host round trip per tile pair on a GPU: measured at the shortest length only
            if not budget.allows(settings.case_needs_s):
                row["skipped"] = "time budget"
            else:
                row = guarded(row, lambda t=tokens, v=variant: prefill_case(
                    config, shape, t, v, kernel_impl, ceilings["matmul_tflops"], budget, settings.repeats, device))
            rows.append(record(row))
    for batch, context in settings.attention_decode_cases:
        for variant in DECODE_VARIANTS:
            row = {"kind": "attention_decode", "batch": batch, "context": context, "variant": variant}
            if not budget.allows(settings.case_needs_s):
                row["skipped"] = "time budget"
            else:
                row = guarded(row, lambda b=batch, c=context, v=variant: decode_case(
                    config, shape, b, c, v, kernel_impl, settings.page_size, ceilings["copy_bandwidth_gbs"],
                    budget, settings.repeats, device))
            rows.append(record(row))
    return rows
