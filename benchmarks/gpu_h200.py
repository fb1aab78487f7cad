"""GPU benchmark for a lent H200: a Llama-2-7B-shaped model (random bf16 weights) against the hardware limit.

Run on the GPU machine (one device is enough); the phases may be split over several commands (each
compiles a few 7B programs), results accumulate in --out:
    python benchmarks/gpu_h200.py --phases ceilings,prefill
    python benchmarks/gpu_h200.py --phases decode,profile    # also writes --cost-model-out
`--tiny` runs the same code path with a tiny config and small shapes on whatever device JAX has (CPU in
the tests), so the script is known to work before a GPU is lent.

Data flow:
  1. Ceilings, measured in the same run: bf16 matmul TFLOP/s (best of a few square sizes) and device copy
     bandwidth (read + write of one large array).
  2. Prefill of one prompt of 4K, 16K, 32K tokens, three ways: single device with the model's reference
     attention (`dense_attention`), single device with the fused attention JAX offers
     (`jax.nn.dot_product_attention`, cuDNN on GPU), and the serving path, the ring program
     (`executor.programs.prefill_program`, greedy sampler fused: the engine's program) on a group of
     d = 1 that also writes the KV into a pool.
     Throughput in tokens/s, MFU = useful FLOPs / s over the measured matmul ceiling, and the ring's
     overhead ratio over the single-device programs. A case that runs out of memory is recorded as such.
  3. Decode step (`executor.programs.decode_program`, greedy sampler fused, d = 1) at batch 1 and 32 with
     4K and 32K contexts:
     step time and achieved HBM bandwidth (weights + KV read per step / step time) over the measured copy
     bandwidth. Cases whose KV cannot fit the device are skipped with the reason.
  4. A profile grid (ring prefill of packed batches, decode at more batch x context points) joins the ring
     and decode cases above in a `scheduler.cost_model.fit_cost_model` fit for d = 1; d > 1 comes from the roofline
     (`scheduler.roofline`) calibrated with the ceilings and efficiencies measured here (one GPU cannot
     measure NVLink: the link figures stay the published ones, written in the file's metadata).
  5. Everything goes to one JSON (`--out`) and the cost model to `--cost-model-out` (the schema of
     `loong_jax/scheduler/cost/model.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, accounting and ceilings: the sibling module
from gpu_accounting import decode_bytes, decode_fits, device_memory, guarded, measure_ceilings, median_seconds, prefill_flops, shape_of  # noqa: E402,E501
from loong_jax.models.attention import dense_attention
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.scheduler.cost.model import CostModel, DecodeSample, PrefillSample, fit_cost_model, save_cost_models
from loong_jax.scheduler.cost.roofline import HardwareCeilings, derive_cost_model
from loong_jax.executor.programs import decode_program, prefill_program
from loong_jax.sampling.batch import PLAIN_GREEDY, SamplingRow, greedy_batch
from loong_jax.sampling.params import SamplingParams
from loong_jax.sharding.decode_program import DecodeRow, layout_decode_batch
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.specs import BY_MEMBER_SPEC, REPLICATED_SPEC
from loong_jax.sharding.stripe_layout import Placement, striped_layout
from loong_jax.sharding.topology import Topology, group_params, place_params

LLAMA2_7B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                        max_position_embeddings=65536, dtype="bfloat16")
TINY = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=4096, dtype="bfloat16")
LOGITS_BUCKET = 8  # scored rows per prefill program: one compiled program serves 1..8 packed prompts
CPU_MEMORY_BYTES = 8e9  # what the roofline assumes where a device reports no memory


@dataclasses.dataclass(frozen=True)
class Settings:
    config: ModelConfig
    prefill_lengths: tuple[int, ...]
    decode_cases: tuple[tuple[int, int], ...]  # (batch, context)
    fit_prefill: tuple[tuple[int, ...], ...]  # packed prompt lengths per profile sample
    fit_decode: tuple[tuple[int, int], ...]
    matmul_sizes: tuple[int, ...]
    copy_bytes: int
    repeats: int
    warmup: int = 2  # untimed calls per case (the first compiles)
    page_size: int = 16


FULL = Settings(
    config=LLAMA2_7B, prefill_lengths=(4096, 16384, 32768),
    decode_cases=((1, 4096), (32, 4096), (1, 32768), (32, 32768)),
    # Profile shapes reuse the compiled programs of the cases above where they can (same rows / pages).
    fit_prefill=((8192,), (1024,) * 4, (2048,) * 2, (1024,) * 8, (4096,) * 4),
    fit_decode=((8, 16384), (32, 2048)),
    matmul_sizes=(4096, 8192, 16384), copy_bytes=4 << 30, repeats=5)
TINY_SETTINGS = Settings(
    # (1, 64) and (1, 70) both need 5 pages of 16: one decode program serves both.
    config=TINY, prefill_lengths=(64, 128), decode_cases=((1, 64), (4, 64), (1, 70)),
    fit_prefill=((32,) * 4, (16,) * 4), fit_decode=((4, 70),),
    matmul_sizes=(64, 128), copy_bytes=1 << 22, repeats=2, warmup=1)


# ---------------------------------------------------------------------------------------------------------------
# 2-3. Programs (1. Ceilings: gpu_accounting.measure_ceilings).
# ---------------------------------------------------------------------------------------------------------------
def fused_attention(layer, q, k, v, positions, segment_ids, kv_cache):
    """JAX's fused attention for ONE prompt at positions 0..T-1 (what the benchmark feeds it)."""
    del layer, positions, segment_ids
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return out.astype(q.dtype), kv_cache


class ModelBench:
    def __init__(self, settings: Settings, device, seed: int = 0):
        self.settings, self.config, self.device = settings, settings.config, device
        with jax.default_device(device):
            model = init_model(self.config, seed)
        self.graphdef, self.state = nnx.split(model)
        self.topology = Topology([device], tp=1)
        self.group = (0,)
        self.mesh = self.topology.group_mesh(self.group)
        self.params = group_params(place_params(self.state, self.topology), self.topology, self.group)
        # The engine's programs for plain greedy requests (what `LLM.warm_up` compiles).
        self.prefill_program = prefill_program(self.graphdef, self.mesh, signature=PLAIN_GREEDY)
        self.decode_program = decode_program(self.graphdef, self.mesh, signature=PLAIN_GREEDY)
        self.rng = np.random.default_rng(seed)
        self._single = {}

    def greedy_sampling(self, rows: int, spec):
        """The sampling inputs of `rows` plain greedy rows (past min_tokens), on the group mesh."""
        greedy_rows = [SamplingRow(SamplingParams(temperature=0.0, max_tokens=1), (), ())] * rows
        return jax.device_put(greedy_batch(greedy_rows, self.config.vocab_size, ()), NamedSharding(self.mesh, spec))

    def tokens(self, count: int) -> np.ndarray:
        return self.rng.integers(0, self.config.vocab_size, size=count).astype(np.int32)

    def pool(self, tokens: int) -> jax.Array:
        pages = math.ceil(tokens / self.settings.page_size) + 1
        shape = PoolShape.for_model(self.config, pages, self.settings.page_size)
        return assemble_group_pool([create_pool(shape, self.topology, 0)], self.mesh)

    def single_device_prefill(self, length: int, attention_name: str) -> float:
        attention = {"dense": dense_attention, "fused": fused_attention}[attention_name]
        if attention_name not in self._single:
            graphdef = self.graphdef

            def forward(state, tokens, positions, segments, last):
                logits, _ = nnx.merge(graphdef, state)(tokens, positions, segments, attention=attention,
                                                       logits_indices=last)
                return logits

            self._single[attention_name] = jax.jit(forward)
        program = self._single[attention_name]
        put = lambda x: jax.device_put(x, self.device)  # noqa: E731
        tokens, positions = put(self.tokens(length)), put(np.arange(length, dtype=np.int32))
        segments, last = put(np.zeros(length, np.int32)), put(np.array([length - 1], np.int32))
        return median_seconds(lambda: program(self.state, tokens, positions, segments, last),
                              self.settings.repeats, self.settings.warmup)

    def ring_prefill(self, lengths: Sequence[int]) -> float:
        """The serving path at d = 1: packed prompts, every token's KV kept densely in the pool."""
        total = int(sum(lengths))
        layout = striped_layout(lengths, members=1)
        placement = Placement(member=np.zeros(total, np.int32), slot=np.arange(total, dtype=np.int32))
        requests = max(LOGITS_BUCKET, len(lengths))
        batch = make_prefill_inputs(layout, self.tokens(total), placement, self.mesh, num_logits=requests)
        sampling = self.greedy_sampling(requests, REPLICATED_SPEC)
        state = {"pool": self.pool(total)}

        def run():
            tokens, state["pool"] = self.prefill_program(self.params, state["pool"], batch, sampling)
            return tokens

        try:
            return median_seconds(run, self.settings.repeats, self.settings.warmup)
        finally:
            del state["pool"]

    def decode_step(self, batch: int, context: int) -> float:
        """One decode step of `batch` requests with `context` tokens of KV each (pages contiguous)."""
        page_size = self.settings.page_size
        pages_per_request = math.ceil((context + 1) / page_size)
        rows = [DecodeRow(token=1, position=context, master=0,
                          append_slot=r * pages_per_request * page_size + context,
                          pages={0: list(range(r * pages_per_request, (r + 1) * pages_per_request))},
                          kv_lens={0: context + 1}) for r in range(batch)]
        inputs = layout_decode_batch(rows, members=1, batch_local=batch, member_pages=batch * pages_per_request,
                                     page_size=page_size).to_device(self.mesh)
        sampling = self.greedy_sampling(batch, BY_MEMBER_SPEC)
        state = {"pool": self.pool(batch * pages_per_request * page_size)}

        def run():
            tokens, state["pool"] = self.decode_program(self.params, state["pool"], inputs, sampling)
            return tokens

        try:
            return median_seconds(run, self.settings.repeats, self.settings.warmup)
        finally:
            del state["pool"]


# ---------------------------------------------------------------------------------------------------------------
# 4. Cost model.
# ---------------------------------------------------------------------------------------------------------------
def build_cost_model(settings: Settings, samples: list, ceilings: dict, efficiencies: dict, memory: float | None,
                     device_kind: str) -> CostModel:
    shape = shape_of(settings.config)
    hardware = HardwareCeilings(
        name=device_kind, matmul_flops=ceilings["matmul_tflops"] * 1e12,
        hbm_bandwidth=ceilings["copy_bandwidth_gbs"] * 1e9, hbm_bytes=memory or CPU_MEMORY_BYTES,
        matmul_efficiency=efficiencies["matmul"], hbm_efficiency=efficiencies["hbm"])
    projected = derive_cost_model(shape, hardware, tp=1, dops=tuple(range(1, 17)), page_size=settings.page_size)
    measured = fit_cost_model(samples, tp=1, kv_bytes_per_token=shape.kv_bytes_per_token,
                              pages_per_instance=projected.pages_per_instance, page_size=settings.page_size,
                              migration_seconds_per_byte=projected.migration_seconds_per_byte,
                              migration_latency_s=projected.migration_latency_s)
    return CostModel(
        tp=1, prefill={**projected.prefill, 1: measured.prefill[1]}, decode={**projected.decode, 1: measured.decode[1]},
        migration_seconds_per_byte=projected.migration_seconds_per_byte,
        migration_latency_s=projected.migration_latency_s, kv_bytes_per_token=shape.kv_bytes_per_token,
        pages_per_instance=projected.pages_per_instance, page_size=settings.page_size,
        description=f"{settings.config.model_type} {shape.layer_params / 1e9:.2f}B-layer model on {device_kind}, "
                    f"tp=1: d=1 fitted to measured programs; d>1 roofline calibrated with measured ceilings",
        provenance="measured",
        metadata={"d1_fit_mean_relative_error": measured.mean_relative_error(samples),
                  "calibrated_hardware": dataclasses.asdict(hardware),
                  "not_measured": "NVLink bandwidth and collective latency (one GPU): published figures",
                  "samples": len(samples)})


# ---------------------------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------------------------
PHASES = ("ceilings", "prefill", "decode", "profile")


class Driver:
    """Runs phases into one report; the model is built only when a phase needs it."""

    def __init__(self, settings: Settings, device, report: dict):
        self.settings, self.device, self.report = settings, device, report
        self.shape = shape_of(settings.config)
        self.memory = device_memory(device)
        self._bench: ModelBench | None = None

    @property
    def bench(self) -> ModelBench:
        if self._bench is None:
            self._bench = ModelBench(self.settings, self.device)
        return self._bench

    def ceilings(self) -> None:
        self.report["ceilings"] = measure_ceilings(self.settings, self.device)
        print(json.dumps({"ceilings": self.report["ceilings"]}), flush=True)

    def prefill(self) -> None:
        ceiling_flops = self.report["ceilings"]["matmul_tflops"] * 1e12

        def measure(length: int, variant: str) -> dict:
            seconds = (self.bench.ring_prefill([length]) if variant == "ring_d1"
                       else self.bench.single_device_prefill(length, variant))
            flops = prefill_flops(self.shape, [length])
            return {"seconds": seconds, "tokens_per_s": length / seconds, "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / ceiling_flops}

        rows = [guarded({"kind": "prefill", "tokens": n, "variant": v}, lambda n=n, v=v: measure(n, v))
                for n in self.settings.prefill_lengths for v in ("dense", "fused", "ring_d1")]
        by_case = {(r["tokens"], r["variant"]): r for r in rows if "error" not in r}
        self.report["prefill"] = rows
        self.report["ring_overhead"] = {
            str(n): {f"ring_over_{v}": by_case[(n, "ring_d1")]["seconds"] / by_case[(n, v)]["seconds"]
                     for v in ("dense", "fused") if (n, v) in by_case and (n, "ring_d1") in by_case}
            for n in self.settings.prefill_lengths}

    def decode(self) -> None:
        bandwidth = self.report["ceilings"]["copy_bandwidth_gbs"] * 1e9
        rows = []
        for batch, context in self.settings.decode_cases:
            record = {"kind": "decode", "batch": batch, "context": context}
            if not decode_fits(self.shape, batch, context, self.memory):
                kv_gib = batch * (context + 1) * self.shape.kv_bytes_per_token / 2**30
                record["skipped"] = f"KV {kv_gib:.0f} GiB + weights exceed 90% of {self.memory / 2**30:.0f} GiB"
                print(json.dumps(record), flush=True)
                rows.append(record)
                continue

            def measure(b=batch, c=context):
                seconds = self.bench.decode_step(b, c)
                achieved = decode_bytes(self.shape, b, c) / seconds
                return {"seconds": seconds, "tokens_per_s": b / seconds,
                        "achieved_bandwidth_gbs": achieved / 1e9, "bandwidth_fraction": achieved / bandwidth}

            rows.append(guarded(record, measure))
        self.report["decode"] = rows

    def profile(self) -> None:
        rows = [guarded({"kind": "profile_prefill", "lengths": list(lengths)},
                        lambda ls=lengths: {"seconds": self.bench.ring_prefill(ls)})
                for lengths in self.settings.fit_prefill]
        rows += [guarded({"kind": "profile_decode", "batch": b, "context": c},
                         lambda b=b, c=c: {"seconds": self.bench.decode_step(b, c)})
                 for b, c in self.settings.fit_decode if decode_fits(self.shape, b, c, self.memory)]
        self.report["profile"] = rows

    def cost_model(self) -> CostModel:
        """d = 1 fitted to the profile (and the prefill / decode cases); d > 1 from the calibrated roofline."""
        rows = self.report.get("profile", []) + self.report.get("prefill", []) + self.report.get("decode", [])
        samples = []
        for row in rows:
            if "seconds" not in row or row.get("variant", "ring_d1") != "ring_d1":
                continue
            if row["kind"] in ("profile_prefill", "prefill"):
                samples.append(PrefillSample(1, tuple(row.get("lengths", [row.get("tokens")])), row["seconds"]))
            else:
                samples.append(DecodeSample(1, row["batch"], row["batch"] * (row["context"] + 1), row["seconds"]))
        samples = list(dict.fromkeys(samples))
        ring = [r for r in self.report.get("prefill", []) if r["variant"] == "ring_d1" and "mfu" in r]
        decode = [r for r in self.report.get("decode", []) if "bandwidth_fraction" in r]
        efficiencies = {"matmul": max((r["mfu"] for r in ring), default=0.5),
                        "hbm": max((r["bandwidth_fraction"] for r in decode), default=0.7)}
        self.report["calibrated_efficiencies"] = efficiencies
        model = build_cost_model(self.settings, samples, self.report["ceilings"], efficiencies, self.memory,
                                 self.device.device_kind)
        self.report["cost_model_d1_fit_mean_relative_error"] = model.metadata["d1_fit_mean_relative_error"]
        return model


def targets(report: dict) -> dict:
    """The issue's targets: prefill MFU and ring overhead at the longest length each variant ran (32K when it
    fits), decode bandwidth at the largest batch (32) and its shortest context (4K)."""
    prefill = [r for r in report.get("prefill", []) if "mfu" in r]
    longest = {}
    for row in sorted(prefill, key=lambda r: r["tokens"]):
        longest[row["variant"]] = row
    overhead = {n: v["ring_over_dense"] for n, v in report.get("ring_overhead", {}).items() if "ring_over_dense" in v}
    overhead_at = max(overhead, key=int, default=None)
    decode = [r for r in report.get("decode", []) if "bandwidth_fraction" in r]
    big_batch = max(decode, key=lambda r: (r["batch"], -r["context"]), default=None)
    return {
        "prefill_mfu_at_longest": {v: {"tokens": r["tokens"], "mfu": r["mfu"]} for v, r in longest.items()},
        "prefill_target_ge_0_5": {v: r["mfu"] >= 0.5 for v, r in longest.items()},
        "decode_case": None if big_batch is None else [big_batch["batch"], big_batch["context"]],
        "decode_bandwidth_fraction": None if big_batch is None else big_batch["bandwidth_fraction"],
        "decode_target_ge_0_7": None if big_batch is None else big_batch["bandwidth_fraction"] >= 0.7,
        "ring_over_dense": None if overhead_at is None else {"tokens": int(overhead_at),
                                                             "ratio": overhead[overhead_at]},
        "ring_target_within_10pct": None if overhead_at is None else overhead[overhead_at] <= 1.10,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and shapes (CPU smoke run)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma list of ceilings, prefill, decode, profile; results accumulate in --out "
                             "(split a long GPU run over several commands)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_h200.json"))
    parser.add_argument("--cost-model-out", type=Path,
                        default=Path("benchmarks/results/h200_llama2_7b_measured.json"))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (median reported)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases takes a comma list of {', '.join(PHASES)}")
    settings = TINY_SETTINGS if args.tiny else FULL
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    device = jax.devices()[0]
    if not args.tiny and device.platform != "gpu":
        print(f"gpu_h200.py: the full run needs a GPU, found {device.platform}; use --tiny to smoke-test",
              file=sys.stderr)
        return 2
    header = {"device": device.device_kind, "platform": device.platform, "mode": "tiny" if args.tiny else "full",
              "memory_bytes": device_memory(device), "config": dataclasses.asdict(settings.config),
              "jax_version": jax.__version__}
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if {k: report.get(k) for k in ("device", "mode")} != {k: header[k] for k in ("device", "mode")}:
        report = {}  # results of another device or mode are not mixed in
    report.update(header)
    if "ceilings" not in report and "ceilings" not in phases:
        phases.insert(0, "ceilings")  # every other phase is measured against them
    driver = Driver(settings, device, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for phase in PHASES:
        if phase in phases:
            getattr(driver, phase)()
            report["targets"] = targets(report)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # a later phase's failure loses nothing
    if "profile" in report:
        model = driver.cost_model()
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.cost_model_out.parent.mkdir(parents=True, exist_ok=True)
        save_cost_models(args.cost_model_out, [model], name=f"{device.device_kind} {report['mode']}",
                         note="profiled by benchmarks/gpu_h200.py")
    print(json.dumps({"targets": report["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
