"""Timing, FLOP/byte accounting and the hardware ceilings of `benchmarks/gpu_h200.py` (one concept: what the
GPU benchmark measures against).

Data flow: `compiled` compiles a jitted function ahead of time and says how long that took; `timed` times
calls after their warm-up, stopping at a repeat count or a time cap, whichever comes first (`median_seconds`
is its median); `Budget` is a run's wall-clock deadline, which every case checks before it starts;
`shape_of` turns a model config into the roofline's `TransformerShape`, from which `prefill_flops`,
`attention_flops`, `decode_bytes` and `decode_kv_bytes` give the useful work of a case; `measure_ceilings`
measures the bf16 matmul and copy ceilings on the device; `environment` records versions and memory;
`guarded` runs one case and records an error (typically out of memory) instead of ending the run (the caller
prints and saves the record).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
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
def compiled(jitted, *args):
    """(`jitted` lowered and compiled for `args`, the seconds that took): compile time recorded apart."""
    start = time.perf_counter()
    program = jitted.lower(*args).compile()
    return program, time.perf_counter() - start


def timed(run: Callable[[], object], repeats: int, warmup: int = 1, cap_s: float | None = None) -> dict:
    """Median wall time of `run()` (its result blocked on) after `warmup` calls, over `repeats` calls or as
    many as fit in `cap_s` seconds (at least one): {"seconds", "repeats"}."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times, began = [], time.perf_counter()
    while len(times) < max(repeats, 1):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
        if cap_s is not None and time.perf_counter() - began >= cap_s:
            break
    return {"seconds": statistics.median(times), "repeats": len(times)}


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 2, cap_s: float | None = None) -> float:
    return timed(run, repeats, warmup, cap_s)["seconds"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A run's wall clock: it ends at `deadline` (time.monotonic()); a case starts only when at least `needed_s`
    is left, and its timed calls stop after `case_cap_s` (compiles are not interrupted: the caller's shell puts
    a hard limit around the whole process)."""

    deadline: float
    case_cap_s: float

    @classmethod
    def of(cls, seconds: float, case_cap_s: float) -> "Budget":
        return cls(time.monotonic() + seconds, case_cap_s)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, needed_s: float) -> bool:
        return self.left_s() >= needed_s

    def cap_s(self) -> float:
        return max(0.0, min(self.case_cap_s, self.left_s()))


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


def attention_flops(shape: TransformerShape, tokens: int) -> float:
    """Useful FLOPs of one layer's causal attention over one prompt: QK^T and PV on the unmasked half."""
    return 2.0 * shape.attention_width * tokens * tokens


def decode_kv_bytes(shape: TransformerShape, batch: int, context: int) -> float:
    """Bytes of one layer's KV that a decode step reads: `batch` requests of `context` tokens."""
    return batch * context * shape.kv_bytes_per_token_per_layer


def decode_fits(shape: TransformerShape, batch: int, context: int, memory: float | None) -> bool:
    """Weights plus the KV of `batch` requests of `context` tokens within 90% of the device memory."""
    needed = shape.weight_bytes + batch * (context + 1) * shape.kv_bytes_per_token
    return memory is None or needed <= 0.9 * memory


def device_memory(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def environment(device) -> dict:
    """Versions of what the run depends on, and the device's memory (XLA's preallocated pool on a GPU)."""
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    memory = {key: stats[key] for key in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use")
              if stats and key in stats}
    return {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
            "versions": versions, "memory": memory}


def guarded(record: dict, work: Callable[[], dict]) -> dict:
    """Run one case; an error (typically out of memory) is recorded instead of ending the run."""
    try:
        record.update(work())
    except Exception as error:  # noqa: BLE001 - XLA raises several types; the message says which
        record["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
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
        seconds = median_seconds(lambda: matmul(a, b), settings.repeats, warmup=1)
        per_size[str(n)] = 2 * n**3 / seconds / 1e12
        best = max(best, per_size[str(n)])
        del a, b
    elements = settings.copy_bytes // 2
    source = jax.device_put(jnp.ones((elements,), jnp.bfloat16), device)
    bump = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))  # reads and writes every element once
    seconds = median_seconds(lambda: bump(source), settings.repeats, warmup=1)
    del source
    return {"matmul_tflops": best, "matmul_tflops_by_size": per_size,
            "copy_bandwidth_gbs": 2 * elements * 2 / seconds / 1e9, "copy_bytes": settings.copy_bytes}
