"""Timing, FLOP/byte accounting and the hardware ceilings of `benchmarks/gpu_h200.py` (one concept: what the
GPU benchmark measures against).

Data flow: `median_seconds` times a jitted call after its warm-up; `shape_of` turns a model config into the
roofline's `TransformerShape`, from which `prefill_flops` and `decode_bytes` give the useful work of a case;
`measure_ceilings` measures the bf16 matmul and copy ceilings on the device; `guarded` runs one case and
records an error (typically out of memory) instead of ending the run.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loong_jax.models.config import ModelConfig
from loong_jax.scheduler.cost.roofline import TransformerShape


# ---------------------------------------------------------------------------------------------------------------
# Timing and accounting.
# ---------------------------------------------------------------------------------------------------------------
def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `run()` (its result blocked on) after `warmup` calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shape_of(config: ModelConfig) -> TransformerShape:
    return TransformerShape(name=config.model_type, layers=config.num_layers, hidden=config.hidden_size,
                            heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                            intermediate=config.intermediate_size, vocab=config.vocab_size,
                            bytes_per_value=np.dtype(config.dtype).itemsize)


def prefill_flops(shape: TransformerShape, lengths: Sequence[int]) -> float:
    """Useful FLOPs of a causal prefill: dense layers, causal attention (masked half not counted), one logit row
    per prompt."""
    total, squares = float(sum(lengths)), float(sum(n * n for n in lengths))
    return (2 * shape.layer_params * total + 2 * shape.layers * shape.attention_width * squares
            + 2 * shape.hidden * shape.vocab * len(lengths))


def decode_bytes(shape: TransformerShape, batch: int, context: int) -> float:
    """Bytes a decode step must read: every weight but the embedding table (rows only), plus the KV."""
    weights = shape.weight_bytes - shape.vocab * shape.hidden * shape.bytes_per_value
    return weights + batch * (context + 1) * shape.kv_bytes_per_token


def decode_fits(shape: TransformerShape, batch: int, context: int, memory: float | None) -> bool:
    """Weights plus the KV of `batch` requests of `context` tokens within 90% of the device memory."""
    needed = shape.weight_bytes + batch * (context + 1) * shape.kv_bytes_per_token
    return memory is None or needed <= 0.9 * memory


def device_memory(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def guarded(record: dict, work: Callable[[], dict]) -> dict:
    """Run one case; an error (typically out of memory) is recorded instead of ending the run."""
    try:
        record.update(work())
    except Exception as error:  # noqa: BLE001 - XLA raises several types; the message says which
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    print(json.dumps(record), flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------------
# 1. Ceilings.
# ---------------------------------------------------------------------------------------------------------------
def measure_ceilings(settings, device) -> dict:
    """`settings`: the benchmark's `Settings` (matmul sizes, copy bytes, repeats, warm-up)."""
    matmul = jax.jit(lambda a, b: a @ b)
    best, per_size = 0.0, {}
    for n in settings.matmul_sizes:
        keys = jax.random.split(jax.random.key(n), 2)
        a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.bfloat16), device) for k in keys)
        seconds = median_seconds(lambda: matmul(a, b), settings.repeats, settings.warmup)
        per_size[str(n)] = 2 * n**3 / seconds / 1e12
        best = max(best, per_size[str(n)])
        del a, b
    elements = settings.copy_bytes // 2
    source = jax.device_put(jnp.ones((elements,), jnp.bfloat16), device)
    bump = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))  # reads and writes every element once
    seconds = median_seconds(lambda: bump(source), settings.repeats, settings.warmup)
    del source
    return {"matmul_tflops": best, "matmul_tflops_by_size": per_size,
            "copy_bandwidth_gbs": 2 * elements * 2 / seconds / 1e9, "copy_bytes": settings.copy_bytes}
