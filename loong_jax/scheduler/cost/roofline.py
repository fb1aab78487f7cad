"""Projected cost model from published hardware ceilings (a roofline), for clusters nobody has profiled yet.

This is how `cost_models/h200_llama2_7b.json` and `cost_models/h100_llama2_7b.json` are made;
`cost_models/H200_DERIVATION.md` writes the same numbers out by hand, with their sources. It is a PROJECTION,
to be replaced by a GPU-measured profile (`loong-jax profile`).

Data flow:
  1. `TransformerShape` gives parameter count, weight bytes and KV bytes per token of a Llama-family model;
     `HardwareCeilings` gives peak matmul FLOP/s, HBM and NVLink bandwidth, memory size and the efficiency
     (fraction of peak) assumed reachable, plus fixed latencies (`H200_SXM`, `H100_SXM`; `A800_SXM` only for
     `published_fixed_cost_check`, which sets the latencies against LoongServe's published step times).
  2. `Roofline` turns them into step times on a group of d instances of tp devices each:
       prefill = overhead + max(dense FLOPs / compute, weights / HBM) + causal attention FLOPs / compute
                 + ring transfer not hidden behind the attention of its ring step + tp all-reduces
       decode  = overhead + max(dense FLOPs / compute, weights / HBM) + KV bytes / HBM
                 + query all-gather and partial-output return (d > 1) + tp all-reduces
     (work split evenly over the d instances: striping balances causal prefill, masters balance decode).
  3. `roofline_samples` evaluates it on a grid of batches; `derive_cost_model` fits the scheduler's linear
     forms to that grid for degrees 1..64 with the same relative-error fit a measured profile gets (so with
     the same width floor: a group of d is never faster than d instances' worth of work), and adds migration
     at the NVLink rate and the KV capacity left in HBM after weights and an activation reserve.
  4. `python -m loong_jax.scheduler.cost.roofline [OUT_DIR]` regenerates both shipped files (tp 1, 2, 4, 8).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from loong_jax.scheduler.cost.fit import fit_cost_model
from loong_jax.scheduler.cost.model import (
    DEFAULT_COST_MODEL_PATH,
    SHIPPED_DIR,
    CostModel,
    DecodeSample,
    PrefillSample,
    ProfileSample,
    save_cost_models,
)


@dataclass(frozen=True)
class TransformerShape:
    """Dense Llama-family decoder (defaults: Llama-2-7B)."""

    name: str = "Llama-2-7B"
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    intermediate: int = 11008
    vocab: int = 32000
    bytes_per_value: int = 2  # bf16 weights and KV

    @property
    def params_per_layer(self) -> int:
        attention = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden  # + the two RMSNorm scales

    @property
    def layer_params(self) -> int:
        return self.layers * self.params_per_layer

    @property
    def total_params(self) -> int:
        return self.layer_params + 2 * self.vocab * self.hidden + self.hidden  # embedding, lm_head, final norm

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.bytes_per_value

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.bytes_per_value  # K and V

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_per_layer

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class HardwareCeilings:
    """One accelerator and its links (defaults: NVIDIA H200 SXM; sources in H200_DERIVATION.md §1).

    Peak figures are the vendor's datasheet ones (dense, no sparsity); the efficiencies say what fraction of
    them the model assumes reachable. The two fixed latencies are calibrated against LoongServe's published
    step times (H200_DERIVATION.md §5, `published_fixed_cost_check`): host- and launch-bound costs that do not
    shrink with a faster GPU.
    """

    name: str = "H200 SXM"
    matmul_flops: float = 989e12  # bf16 dense, FLOP/s
    hbm_bandwidth: float = 4.8e12  # bytes/s
    nvlink_bandwidth: float = 450e9  # bytes/s per direction (900 GB/s total)
    hbm_bytes: float = 141e9
    matmul_efficiency: float = 0.60  # fraction of peak FLOP/s reached by large GEMMs and FlashAttention
    hbm_efficiency: float = 0.70  # fraction of peak bandwidth reached by weight and KV streaming
    nvlink_efficiency: float = 0.80  # fraction of link bandwidth reached by large transfers
    collective_latency_s: float = 56e-6  # fixed cost of one collective (tp all-reduce, decode exchange, migration)
    ring_step_latency_s: float = 248e-6  # fixed cost of one prefill ring step of a layer (p2p send/recv + sync)
    step_overhead_s: float = 0.5e-3  # host-side launch, sampling and bookkeeping per step
    memory_reserve_fraction: float = 0.10  # HBM kept for activations, workspace, communication buffers

    @property
    def compute(self) -> float:
        return self.matmul_flops * self.matmul_efficiency

    @property
    def memory(self) -> float:
        return self.hbm_bandwidth * self.hbm_efficiency

    @property
    def link(self) -> float:
        return self.nvlink_bandwidth * self.nvlink_efficiency


H200_SXM = HardwareCeilings()
H100_SXM = HardwareCeilings(name="H100 SXM", hbm_bandwidth=3.35e12, hbm_bytes=80e9)
# The GPU of LoongServe's published measurements (A100 SXM with NVLink cut to 400 GB/s): only for the check.
A800_SXM = HardwareCeilings(name="A800 SXM", matmul_flops=312e12, hbm_bandwidth=2.039e12, nvlink_bandwidth=200e9,
                            hbm_bytes=80e9)

MAX_SHIPPED_DOP = 64  # degrees 1..64 in the shipped files: a group may span a 64-instance cluster
SHIPPED_FILES = ((H200_SXM, DEFAULT_COST_MODEL_PATH.name), (H100_SXM, "h100_llama2_7b.json"))

# LoongServe (arXiv 2404.09526), 8 x A800 at SP 4 x TP 2, LWM-1M (Llama-2-7B shape): a 100-token prefill and
# one decode step, in seconds.
LOONGSERVE_PREFILL_100_TOKENS_S = 32.8e-3
LOONGSERVE_DECODE_STEP_S = 12.4e-3


@dataclass(frozen=True)
class Roofline:
    shape: TransformerShape
    hardware: HardwareCeilings
    tp: int

    def kv_capacity_tokens(self) -> int:
        """KV tokens one instance (tp devices) holds after weights and the activation reserve."""
        usable = self.tp * self.hardware.hbm_bytes * (1 - self.hardware.memory_reserve_fraction)
        free = usable - self.shape.weight_bytes
        if free <= 0:
            raise ValueError(f"{self.shape.name} weights do not fit on tp={self.tp} x {self.hardware.name}")
        return int(free // self.shape.kv_bytes_per_token)

    def _weight_stream_s(self) -> float:
        return self.shape.weight_bytes / self.tp / self.hardware.memory

    def _tp_allreduce_s(self, tokens_per_instance: float) -> float:
        """Two all-reduces per layer (after attention and after the MLP) of the activations, ring algorithm."""
        if self.tp == 1:
            return 0.0
        message = tokens_per_instance * self.shape.hidden * self.shape.bytes_per_value
        one = 2 * (self.tp - 1) / self.tp * message / self.hardware.link + self.hardware.collective_latency_s
        return 2 * self.shape.layers * one

    def prefill_seconds(self, dop: int, lengths: Sequence[int]) -> float:
        lengths_array = np.asarray(lengths, dtype=np.float64)
        sum_lengths, sum_squares = float(lengths_array.sum()), float(np.square(lengths_array).sum())
        devices = dop * self.tp
        dense_compute = 2 * self.shape.layer_params * sum_lengths / (devices * self.hardware.compute)
        dense = max(dense_compute, self._weight_stream_s())
        # Causal attention: QKᵀ and PV are 2·l²·width FLOPs each per layer, half of them masked.
        attention = 2 * self.shape.layers * self.shape.attention_width * sum_squares / (devices * self.hardware.compute)
        ring = 0.0
        if dop > 1:
            # Each of the d-1 ring steps of a layer moves one instance's KV block; it hides behind the
            # attention of the step (1/d of the layer's attention) and only the remainder shows.
            block_bytes = sum_lengths / dop * self.shape.kv_bytes_per_token_per_layer / self.tp
            transfer = block_bytes / self.hardware.link + self.hardware.ring_step_latency_s
            attention_per_step = attention / (self.shape.layers * dop)
            ring = self.shape.layers * (dop - 1) * max(0.0, transfer - attention_per_step)
        allreduce = self._tp_allreduce_s(sum_lengths / dop)
        return self.hardware.step_overhead_s + dense + attention + ring + allreduce

    def decode_seconds(self, dop: int, batch: int, total_context: int) -> float:
        requests_per_master = batch / dop
        decode_params = self.shape.layer_params + self.shape.vocab * self.shape.hidden  # + lm_head per token
        dense_compute = 2 * decode_params * requests_per_master / (self.tp * self.hardware.compute)
        dense = max(dense_compute, self._weight_stream_s())
        # Every instance reads the KV it holds; KV is spread evenly over the group.
        kv_read = total_context * self.shape.kv_bytes_per_token / (dop * self.tp * self.hardware.memory)
        exchange = 0.0
        if dop > 1:
            # Per layer: all-gather queries (bf16) and return partial outputs (f32) + log-sum-exp to masters.
            bytes_per_layer = batch * self.shape.attention_width * (2 + 4) / self.tp
            exchange = self.shape.layers * (2 * self.hardware.collective_latency_s + bytes_per_layer / self.hardware.link)
        allreduce = self._tp_allreduce_s(requests_per_master)
        return self.hardware.step_overhead_s + dense + kv_read + exchange + allreduce

    def migration_seconds_per_byte(self) -> float:
        """An instance's KV moves over tp links in parallel (each device sends its head shard)."""
        return 1.0 / (self.tp * self.hardware.link)


def roofline_samples(roofline: Roofline, dop: int, seed: int = 0) -> list[ProfileSample]:
    """The grid a profiler would measure: single prompts 16..cap, packed short batches, decode batch × context."""
    rng = np.random.default_rng(seed)
    capacity = dop * roofline.kv_capacity_tokens()
    samples: list[ProfileSample] = []
    for length in np.geomspace(16, min(capacity, 512 * 1024), 40).astype(int):
        samples.append(PrefillSample(dop, (int(length),), roofline.prefill_seconds(dop, [length])))
    for count in (2, 4, 8, 16, 32, 64):
        for typical in np.geomspace(16, 4096, 10):
            lengths = tuple(int(x) for x in rng.integers(max(1, int(typical / 2)), int(typical * 1.5) + 1, size=count))
            samples.append(PrefillSample(dop, lengths, roofline.prefill_seconds(dop, lengths)))
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        for mean_context in np.geomspace(16, 200_000, 12):
            total_context = int(batch * mean_context)
            if total_context <= capacity:
                seconds = roofline.decode_seconds(dop, batch, total_context)
                samples.append(DecodeSample(dop, batch, total_context, seconds))
    return samples


def derive_cost_model(
    shape: TransformerShape = TransformerShape(),
    hardware: HardwareCeilings = HardwareCeilings(),
    tp: int = 1,
    dops: Sequence[int] = tuple(range(1, MAX_SHIPPED_DOP + 1)),
    page_size: int = 16,
) -> CostModel:
    roofline = Roofline(shape, hardware, tp)
    samples = [sample for dop in dops for sample in roofline_samples(roofline, dop, seed=dop)]
    model = fit_cost_model(
        samples,
        tp=tp,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        pages_per_instance=roofline.kv_capacity_tokens() // page_size,
        page_size=page_size,
        migration_seconds_per_byte=roofline.migration_seconds_per_byte(),
        migration_latency_s=hardware.collective_latency_s,
        description=f"{shape.name} on {hardware.name}, tp={tp}: PROJECTED from hardware ceilings (roofline fit)",
        provenance="projected",
        metadata={"shape": asdict(shape), "hardware": asdict(hardware)},
    )
    fit_error = model.mean_relative_error(samples)
    return replace(model, metadata={**model.metadata, "roofline_fit_mean_relative_error": fit_error})


def published_fixed_cost_check(shape: TransformerShape = TransformerShape()) -> dict[str, float]:
    """The roofline on LoongServe's hardware and layout (A800, tp 2, d 4) next to its published step times:
    a 100-token prefill and a decode step of one request with a 100-token context, in seconds."""
    roofline = Roofline(shape, A800_SXM, tp=2)
    return {
        "prefill_100_tokens_model_s": roofline.prefill_seconds(4, [100]),
        "prefill_100_tokens_published_s": LOONGSERVE_PREFILL_100_TOKENS_S,
        "decode_step_model_s": roofline.decode_seconds(4, 1, 100),
        "decode_step_published_s": LOONGSERVE_DECODE_STEP_S,
    }


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path(argv[0]) if argv else SHIPPED_DIR
    for hardware, file_name in SHIPPED_FILES:
        models = [derive_cost_model(hardware=hardware, tp=tp) for tp in (1, 2, 4, 8)]
        out = out_dir / file_name
        save_cost_models(
            out,
            models,
            name=out.stem,
            note=f"PROJECTED from published {hardware.name} ceilings (see H200_DERIVATION.md); "
                 "replace with a GPU-measured profile.",
        )
        for model in models:
            error = model.metadata["roofline_fit_mean_relative_error"]
            print(f"{hardware.name} tp={model.tp}: {model.pages_per_instance} pages/instance, "
                  f"roofline fit mean relative error {error:.3f}")
        print(f"wrote {out}")
    for key, value in published_fixed_cost_check().items():
        print(f"A800 tp 2, d 4 (LoongServe's layout): {key} = {1e3 * value:.1f} ms")


if __name__ == "__main__":
    main()
