"""The measured cost-model file of `benchmarks/gpu_h200.py`: its whole-model cases fitted for d = 1, the roofline
calibrated with the measured ceilings and efficiencies for d > 1.

Data flow: `cost_model_samples(report)` reads the report's model cases into the scheduler's profile samples
(complete once there are 3 prefill and 3 decode samples, what `fit_cost_model` needs); `build_cost_model` fits
d = 1 to them and derives d > 1 from `scheduler.cost.roofline` with the measured matmul and copy ceilings and
the efficiencies the model reached (one GPU cannot measure NVLink: those figures stay the published ones,
noted in the file's metadata); every degree is then raised to the fit's floors (`raised_to_floors`), so a
measured d = 1 slower than the roofline never leaves a wider group faster than its members.
"""

from __future__ import annotations

import dataclasses

from gpu_accounting import shape_of
from loong_jax.scheduler.cost.fit import fit_cost_model, raised_to_floors
from loong_jax.scheduler.cost.model import CostModel, DecodeSample, PrefillSample
from loong_jax.scheduler.cost.roofline import HardwareCeilings, derive_cost_model

MIN_SAMPLES = 3  # per kind, as fit_cost_model requires
CPU_MEMORY_BYTES = 8e9  # what the roofline assumes where a device reports no memory


@dataclasses.dataclass(frozen=True)
class ModelSamples:
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    best_mfu: float | None
    best_bandwidth_fraction: float | None

    @property
    def complete(self) -> bool:
        return len(self.prefill) >= MIN_SAMPLES and len(self.decode) >= MIN_SAMPLES


def cost_model_samples(report: dict) -> ModelSamples:
    rows = [r for r in report.get("model", []) if "seconds" in r]
    prefill = [r for r in rows if r["kind"] == "model_prefill"]
    decode = [r for r in rows if r["kind"] == "model_decode"]
    return ModelSamples(
        prefill=tuple(PrefillSample(1, tuple(r["lengths"]), r["seconds"]) for r in prefill),
        decode=tuple(DecodeSample(1, r["batch"], r["batch"] * (r["context"] + 1), r["seconds"]) for r in decode),
        best_mfu=max((r["mfu"] for r in prefill), default=None),
        best_bandwidth_fraction=max((r["bandwidth_fraction"] for r in decode), default=None))


def build_cost_model(settings, samples: ModelSamples, ceilings: dict, memory: float | None,
                     device_kind: str) -> CostModel:
    """`settings`: the benchmark's `Settings` (model config, page size)."""
    shape = shape_of(settings.config)
    hardware = HardwareCeilings(
        name=device_kind, matmul_flops=ceilings["matmul_tflops"] * 1e12,
        hbm_bandwidth=ceilings["copy_bandwidth_gbs"] * 1e9, hbm_bytes=memory or CPU_MEMORY_BYTES,
        matmul_efficiency=min(1.0, samples.best_mfu or 0.5),
        hbm_efficiency=min(1.0, samples.best_bandwidth_fraction or 0.7))
    projected = derive_cost_model(shape, hardware, tp=1, dops=tuple(range(1, 17)), page_size=settings.page_size)
    measured_samples = samples.prefill + samples.decode
    measured = fit_cost_model(measured_samples, tp=1, kv_bytes_per_token=shape.kv_bytes_per_token,
                              pages_per_instance=projected.pages_per_instance, page_size=settings.page_size,
                              migration_seconds_per_byte=projected.migration_seconds_per_byte,
                              migration_latency_s=projected.migration_latency_s)
    return CostModel(
        tp=1, prefill=raised_to_floors({**projected.prefill, 1: measured.prefill[1]}),
        decode=raised_to_floors({**projected.decode, 1: measured.decode[1]}),
        migration_seconds_per_byte=projected.migration_seconds_per_byte,
        migration_latency_s=projected.migration_latency_s, kv_bytes_per_token=shape.kv_bytes_per_token,
        pages_per_instance=projected.pages_per_instance, page_size=settings.page_size,
        description=f"{settings.config.model_type} {shape.layer_params / 1e9:.2f}B-layer model on {device_kind}, "
                    f"tp=1: d=1 fitted to measured programs; d>1 roofline calibrated with measured ceilings",
        provenance="measured",
        metadata={"d1_fit_mean_relative_error": measured.mean_relative_error(measured_samples),
                  "calibrated_hardware": dataclasses.asdict(hardware),
                  "not_measured": "NVLink bandwidth and collective latency (one GPU): published figures",
                  "samples": len(measured_samples)})
