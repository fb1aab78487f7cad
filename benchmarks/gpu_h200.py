"""GPU benchmark that fits a short lease (one H100 or H200, under 9 minutes): attention per layer against the
hardware ceilings, then one Llama-2-7B-shaped model (random bf16 weights) end to end.

`benchmarks/gpu_run.sh` is the one command a GPU machine runs: it installs the project from the copied tree
(no network) and runs this script in two processes, each under a hard time limit, results accumulating in
one JSON. `--tiny` runs every case at tiny shapes on whatever device JAX has (the kernels in Pallas interpret
mode on a CPU), so the script is known to work before a GPU is lent.

Data flow (phases, in order; `--phases` picks some):
  env        versions, device and memory (XLA's pool: XLA_PYTHON_CLIENT_MEM_FRACTION is raised to 0.92 before
             JAX starts, so a 7B model plus 8 x 4K of KV, and one layer of 32 x 4K, fit an H100).
  ceilings   bf16 matmul TFLOP/s and device copy bandwidth, measured here (`gpu_accounting.measure_ceilings`).
  exactness  the demo model in float32 (matmul precision "highest"), greedy, through the engine (`LLM`) on
             the device with the engine's attention there (the kernels on a GPU) and on the host CPU with the
             XLA reference: the tokens must be equal.
  attention  one layer (`gpu_attention`): prefill at 4K/16K/32K for the project kernel and cuDNN's fused
             attention, the current XLA path at 4K only; paged decode at 32 x 4K and 1 x 32K, kernel vs the
             current path. TFLOP/s, bandwidth, compile seconds.
  model      the engine's programs (`executor.programs.prefill_program` / `decode_program`, greedy sampler
             fused, d = 1, kernels on a GPU): prefill of 4K tokens (then the same program on packed prompts
             of the same total) and decode of 8 x 4K (then fewer rows or shorter contexts on the same
             program); MFU, bandwidth, compile seconds. These samples fit the d = 1 cost model; d > 1 comes
             from the roofline calibrated with the measured ceilings (`--cost-model-out`).
Every case is compiled ahead of time (compile seconds recorded apart) and timed within a per-case cap; a case
starts only while the run's budget (`--budget-s`) allows; the report is rewritten after every case.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # before JAX starts: see the docstring

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules
from gpu_accounting import (Budget, compiled, decode_bytes, device_memory, environment, guarded,  # noqa: E402
                            measure_ceilings, prefill_flops, shape_of, timed)
from gpu_attention import run_attention_phase  # noqa: E402
from gpu_cost_model import build_cost_model, cost_model_samples  # noqa: E402
from loong_jax.executor.programs import decode_program, prefill_program  # noqa: E402
from loong_jax.models.config import ModelConfig  # noqa: E402
from loong_jax.entrypoints.llm import LLM  # noqa: E402
from loong_jax.models.kernels.dispatch import ATTENTION_ENV, AUTO, INTERPRET, REFERENCE, for_platform  # noqa: E402
from loong_jax.models.llama import abstract_model, init_model  # noqa: E402
from loong_jax.sampling.batch import PLAIN_GREEDY, SamplingRow, greedy_batch  # noqa: E402
from loong_jax.sampling.params import SamplingParams  # noqa: E402
from loong_jax.scheduler.cost.model import save_cost_models  # noqa: E402
from loong_jax.sharding.decode_program import DecodeRow, layout_decode_batch  # noqa: E402
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool  # noqa: E402
from loong_jax.sharding.prefill_program import make_prefill_inputs  # noqa: E402
from loong_jax.sharding.specs import BY_MEMBER_SPEC, POOL_SPEC, REPLICATED_SPEC  # noqa: E402
from loong_jax.sharding.stripe_layout import Placement, striped_layout  # noqa: E402
from loong_jax.sharding.topology import Topology, group_params, param_spec, place_params  # noqa: E402

LLAMA2_7B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                        max_position_embeddings=65536, dtype="bfloat16")
TINY = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096, dtype="bfloat16")
LOGITS_BUCKET = 8  # scored rows per prefill program: one compiled program serves 1..8 packed prompts
EXACTNESS_PROMPT = 'def read_config(path):\n    """Return the'
EXACTNESS_TOKENS = 48


@dataclasses.dataclass(frozen=True)
class Settings:
    config: ModelConfig
    attention_lengths: tuple[int, ...]
    current_path_lengths: tuple[int, ...]  # prefill lengths the current XLA path is measured at
    attention_decode_cases: tuple[tuple[int, int], ...]  # (batch, context) of one layer
    model_prefill: tuple[tuple[int, ...], ...]  # packed prompts of one total length: one program; first = headline
    model_decode_capacity: tuple[int, int]  # (rows, context) the decode program is compiled for: the headline
    model_decode: tuple[tuple[int, int], ...]  # (rows, context) run on that program
    matmul_sizes: tuple[int, ...]
    copy_bytes: int
    repeats: int
    case_cap_s: float  # timed calls of one case stop after this long
    case_needs_s: float  # a case starts only with this much of the budget left
    page_size: int = 16


FULL = Settings(
    config=LLAMA2_7B, attention_lengths=(4096, 16384, 32768), current_path_lengths=(4096,),
    attention_decode_cases=((32, 4096), (1, 32768)),
    model_prefill=((4096,), (2048,) * 2, (1024,) * 4, (512,) * 8),
    model_decode_capacity=(8, 4096), model_decode=((8, 4096), (8, 2048), (4, 4096), (2, 1024)),
    matmul_sizes=(4096, 8192), copy_bytes=4 << 30, repeats=5, case_cap_s=8.0, case_needs_s=15.0)
TINY_SETTINGS = Settings(
    config=TINY, attention_lengths=(64, 128), current_path_lengths=(64,), attention_decode_cases=((4, 64), (1, 200)),
    model_prefill=((64,), (32,) * 2, (16,) * 4), model_decode_capacity=(4, 64),
    model_decode=((4, 64), (4, 32), (2, 64)),
    matmul_sizes=(64, 128), copy_bytes=1 << 22, repeats=2, case_cap_s=2.0, case_needs_s=0.0)


class ModelBench:
    """The model's weights on one device and the engine's programs for it, compiled once per shape.

    abstract: weights and pools are ShapeDtypeStructs, nothing is allocated: the programs can only be lowered
    (how the tests check, on a CPU, that the full-size cases lower for CUDA)."""

    def __init__(self, settings: Settings, device, attention_impl: str, seed: int = 0, *, abstract: bool = False):
        self.settings, self.config, self.device, self.abstract = settings, settings.config, device, abstract
        self.topology = Topology([device], tp=1)
        self.mesh = self.topology.group_mesh((0,))
        if abstract:
            self.graphdef, state = nnx.split(abstract_model(self.config))
            self.params = jax.tree_util.tree_map_with_path(
                lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                        sharding=NamedSharding(self.mesh, param_spec(path))), state)
        else:
            with jax.default_device(device):
                self.graphdef, state = nnx.split(init_model(self.config, seed))
            self.params = group_params(place_params(state, self.topology), self.topology, (0,))
        del state  # only the placed copy stays
        self.prefill_program = prefill_program(self.graphdef, self.mesh, attention_impl, PLAIN_GREEDY)
        self.decode_program = decode_program(self.graphdef, self.mesh, attention_impl, PLAIN_GREEDY)
        self.rng = np.random.default_rng(seed)
        self.compile_seconds: dict[str, float] = {}  # program name -> seconds to compile it
        self._compiled: dict[str, object] = {}

    def _program(self, name: str, jitted, *args):
        if name not in self._compiled:
            self._compiled[name], self.compile_seconds[name] = compiled(jitted, *args)
        return self._compiled[name]

    def _greedy_sampling(self, rows: int, spec):
        greedy_rows = [SamplingRow(SamplingParams(temperature=0.0, max_tokens=1), (), ())] * rows
        return jax.device_put(greedy_batch(greedy_rows, self.config.vocab_size, ()), NamedSharding(self.mesh, spec))

    def _pool(self, pages: int) -> jax.Array:
        shape = PoolShape.for_model(self.config, pages, self.settings.page_size)
        if self.abstract:
            return jax.ShapeDtypeStruct(shape.group_shape(1), jnp.dtype(shape.dtype),
                                        sharding=NamedSharding(self.mesh, POOL_SPEC))
        return assemble_group_pool([create_pool(shape, self.topology, 0)], self.mesh)

    def prefill_args(self, lengths: Sequence[int]) -> tuple:
        """(params, pool, inputs, sampling) of the serving path at d = 1: packed prompts, every token's KV kept
        densely in the pool."""
        total = int(sum(lengths))
        placement = Placement(member=np.zeros(total, np.int32), slot=np.arange(total, dtype=np.int32))
        tokens = self.rng.integers(0, self.config.vocab_size, total).astype(np.int32)
        batch = make_prefill_inputs(striped_layout(lengths, members=1), tokens, placement, self.mesh,
                                    num_logits=max(LOGITS_BUCKET, len(lengths)))
        sampling = self._greedy_sampling(max(LOGITS_BUCKET, len(lengths)), REPLICATED_SPEC)
        return self.params, self._pool(math.ceil(total / self.settings.page_size) + 1), batch, sampling

    def decode_args(self, rows: int, context: int) -> tuple:
        """(params, pool, inputs, sampling) of one decode step of `rows` requests with `context` tokens of KV
        each, in the shapes of `model_decode_capacity` (fewer rows and pages are padding, as in the engine's
        buckets: one program serves every decode case)."""
        page_size = self.settings.page_size
        capacity_rows, capacity_context = self.settings.model_decode_capacity
        pages_per_request = math.ceil((capacity_context + 1) / page_size)
        requests = [DecodeRow(token=1, position=context, master=0,
                              append_slot=r * pages_per_request * page_size + context,
                              pages={0: list(range(r * pages_per_request,
                                                   r * pages_per_request + math.ceil((context + 1) / page_size)))},
                              kv_lens={0: context + 1}) for r in range(rows)]
        inputs = layout_decode_batch(requests, members=1, batch_local=capacity_rows,
                                     member_pages=capacity_rows * pages_per_request,
                                     page_size=page_size).to_device(self.mesh)
        sampling = self._greedy_sampling(capacity_rows, BY_MEMBER_SPEC)
        return self.params, self._pool(capacity_rows * pages_per_request), inputs, sampling

    def prefill(self, lengths: Sequence[int], cap_s: float) -> dict:
        return self._time(f"prefill {sum(lengths)}", self.prefill_program, self.prefill_args(lengths), cap_s)

    def decode(self, rows: int, context: int, cap_s: float) -> dict:
        return self._time("decode", self.decode_program, self.decode_args(rows, context), cap_s)

    def _time(self, name: str, jitted, args: tuple, cap_s: float) -> dict:
        params, pool, inputs, sampling = args
        program = self._program(name, jitted, *args)
        state = {"pool": pool}  # donated at each call: the program hands the same buffers back

        def run():
            sampled, state["pool"] = program(params, state["pool"], inputs, sampling)
            return sampled

        return timed(run, self.settings.repeats, warmup=1, cap_s=cap_s)


@contextlib.contextmanager
def attention_env(impl: str):
    """`LOONG_JAX_ATTENTION` = impl while an engine is built (the engine reads it once, then keeps its choice)."""
    before = os.environ.get(ATTENTION_ENV)
    os.environ[ATTENTION_ENV] = impl
    try:
        yield
    finally:
        if before is None:
            del os.environ[ATTENTION_ENV]
        else:
            os.environ[ATTENTION_ENV] = before


def greedy_demo_tokens(device, impl: str) -> list[int]:
    """The demo model's float32 greedy tokens for EXACTNESS_PROMPT, through the engine on `device`."""
    with attention_env(impl):
        llm = LLM(devices=[device], dtype="float32", warmup=False, progress=False, compilation_cache_dir=None)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=EXACTNESS_TOKENS, ignore_eos=True)
        return list(llm.generate(EXACTNESS_PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids)
    finally:
        llm.close()


def exactness_case(device, device_impl: str) -> dict:
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        on_device = greedy_demo_tokens(device, device_impl)
        on_cpu = greedy_demo_tokens(jax.devices("cpu")[0], REFERENCE)
    finally:
        jax.config.update("jax_default_matmul_precision", previous)
    first_difference = next((i for i, (a, b) in enumerate(zip(on_device, on_cpu)) if a != b), None)
    return {"equal": on_device == on_cpu, "tokens": len(on_cpu), "first_difference": first_difference,
            "device_tokens": on_device, "cpu_tokens": on_cpu}


class Driver:
    """Runs the phases into one report, rewritten (and each case printed) as it goes."""

    def __init__(self, settings: Settings, device, report: dict, out: Path, budget: Budget, kernel_impl: str,
                 model_impl: str):
        self.settings, self.device, self.report, self.out = settings, device, report, out
        self.budget, self.kernel_impl, self.model_impl = budget, kernel_impl, model_impl
        self.shape = shape_of(settings.config)

    def record(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        self.save()
        return row

    def save(self) -> None:
        """Written whole, then renamed: a process stopped at its time limit leaves the last complete report."""
        self.report["targets"] = targets(self.report)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(partial, self.out)

    def env(self) -> None:
        self.report["environment"] = self.record(environment(self.device))

    def ceilings(self) -> None:
        self.report["ceilings"] = measure_ceilings(self.settings, self.device)
        self.record({"ceilings": self.report["ceilings"]})

    def exactness(self) -> None:
        # The engine's own choice on the device (the kernels on a GPU; interpreting them through a whole engine
        # would take minutes on a CPU).
        row = {"kind": "exactness", "model": "demo", "dtype": "float32", "attention": self.model_impl}
        self.report["exactness"] = self.record(guarded(row, lambda: exactness_case(self.device, self.model_impl)))

    def attention(self) -> None:
        self.report["attention"] = []
        run_attention_phase(self.settings, self.shape, self.report["ceilings"], self.kernel_impl, self.budget,
                            self.device, lambda row: self._append("attention", row))

    def model(self) -> None:
        self.report["model"] = []
        matmul, copy = self.report["ceilings"]["matmul_tflops"] * 1e12, self.report["ceilings"]["copy_bandwidth_gbs"]
        bench = ModelBench(self.settings, self.device, self.model_impl)
        self.report["model_compile_s"] = bench.compile_seconds  # filled as programs compile: saved with each case
        for lengths in self.settings.model_prefill:
            def measure(ls=lengths):
                result = bench.prefill(ls, self.budget.cap_s())
                flops = prefill_flops(self.shape, ls)
                seconds = result["seconds"]
                return {**result, "tokens_per_s": sum(ls) / seconds, "mfu": flops / seconds / matmul}
            self._case({"kind": "model_prefill", "lengths": list(lengths)}, measure)
        # The decode program compiles at its first case: start it only with time for a compile like prefill's.
        compile_needs_s = 1.2 * max(bench.compile_seconds.values(), default=0.0)
        for rows, context in self.settings.model_decode:
            def measure(b=rows, c=context):
                result = bench.decode(b, c, self.budget.cap_s())
                gbs = decode_bytes(self.shape, b, c) / result["seconds"] / 1e9
                return {**result, "tokens_per_s": b / result["seconds"], "achieved_bandwidth_gbs": gbs,
                        "bandwidth_fraction": gbs / copy}
            self._case({"kind": "model_decode", "batch": rows, "context": context}, measure, compile_needs_s)
            compile_needs_s = 0.0

    def _case(self, row: dict, measure, compile_needs_s: float = 0.0) -> None:
        if self.budget.allows(self.settings.case_needs_s + compile_needs_s):
            row = guarded(row, measure)
        else:
            row["skipped"] = "time budget"
        self._append("model", row)

    def _append(self, phase: str, row: dict) -> dict:
        self.report[phase].append(row)
        return self.record(row)


PHASES = ("env", "ceilings", "exactness", "attention", "model")


def targets(report: dict) -> dict:
    """The issue's targets, read off what ran (None where a case did not)."""
    attention = [r for r in report.get("attention", []) if "seconds" in r]
    prefill = {(r["tokens"], r["variant"]): r for r in attention if r["kind"] == "attention_prefill"}
    decode = {(r["batch"], r["context"], r["variant"]): r for r in attention if r["kind"] == "attention_decode"}
    model = [r for r in report.get("model", []) if "seconds" in r]
    headline_prefill = next((r for r in model if r["kind"] == "model_prefill"), None)
    kernel_vs_cudnn = {str(n): prefill[(n, "cudnn")]["seconds"] / prefill[(n, "kernel")]["seconds"]
                       for n, v in prefill if v == "kernel" and (n, "cudnn") in prefill}
    return {
        "prefill_kernel_matmul_fraction": {str(n): r["matmul_fraction"] for (n, v), r in prefill.items()
                                           if v == "kernel"},
        "prefill_kernel_speed_over_cudnn": kernel_vs_cudnn,  # >= 0.9: within 10% of cuDNN
        "decode_kernel_copy_fraction": {f"{b}x{c}": r["copy_fraction"] for (b, c, v), r in decode.items()
                                        if v == "kernel"},
        "model_prefill_mfu": None if headline_prefill is None else headline_prefill["mfu"],
        "float32_greedy_tokens_equal_cpu": report.get("exactness", {}).get("equal"),
    }


def read_report(path: Path) -> dict:
    """The report an earlier process of the same run left, or {} (none, or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and shapes (CPU smoke run)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock seconds for this process; a case starts only while enough is left")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_h200.json"))
    parser.add_argument("--cost-model-out", type=Path, default=Path("benchmarks/results/gpu_llama2_7b_measured.json"))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (median reported)")
    parser.add_argument("--unrolled-layers", action="store_true",
                        help="the model's layers as a Python loop (ModelConfig.scan_layers=False), to compare with "
                             "the default layer scan (use another --out)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases takes a comma list of {', '.join(PHASES)}")
    settings = TINY_SETTINGS if args.tiny else FULL
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    if args.unrolled_layers:
        settings = dataclasses.replace(settings, config=settings.config.with_scan_layers(False))
    device = jax.devices()[0]
    if not args.tiny and device.platform != "gpu":
        print(f"gpu_h200.py: the full run needs a GPU, found {device.platform}; use --tiny to smoke-test",
              file=sys.stderr)
        return 2
    # The model runs the engine's choice for this platform (the kernels on a GPU, the XLA code on a CPU); the
    # attention phase measures the kernels, interpreted on a CPU.
    model_impl = for_platform(AUTO, device.platform)
    kernel_impl = INTERPRET if device.platform == "cpu" else model_impl
    header = {"device": device.device_kind, "platform": device.platform, "mode": "tiny" if args.tiny else "full",
              "attention_impl": {"attention_phase_kernel": kernel_impl, "model": model_impl},
              "config": dataclasses.asdict(settings.config)}
    report = read_report(args.out)
    if {k: report.get(k) for k in ("device", "mode")} != {k: header[k] for k in ("device", "mode")}:
        report = {}  # results of another device or mode are not mixed in
    report.update(header)
    if "ceilings" not in report and "ceilings" not in phases:
        phases.insert(0, "ceilings")  # every other phase is measured against them
    args.out.parent.mkdir(parents=True, exist_ok=True)
    driver = Driver(settings, device, report, args.out, Budget.of(args.budget_s, settings.case_cap_s), kernel_impl,
                    model_impl)
    for phase in PHASES:
        if phase in phases:
            getattr(driver, phase)()
            driver.save()
    samples = cost_model_samples(report)
    if "model" in phases and samples.complete:
        model = build_cost_model(settings, samples, report["ceilings"], device_memory(device), device.device_kind)
        report["cost_model_d1_fit_mean_relative_error"] = model.metadata["d1_fit_mean_relative_error"]
        driver.save()
        args.cost_model_out.parent.mkdir(parents=True, exist_ok=True)
        save_cost_models(args.cost_model_out, [model], name=f"{device.device_kind} {report['mode']}",
                         note="profiled by benchmarks/gpu_h200.py")
    print(json.dumps({"targets": report["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
