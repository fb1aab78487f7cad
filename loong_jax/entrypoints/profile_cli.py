"""`loong-jax profile`: measure the real programs, fit the cost model, print its quality, write the JSON.

Data flow:
  1. Flags -> a `ProfileGrid` (`--quick` for tests, or the full grid; token counts times `--scale`) and the
     degrees to measure (every aligned degree of the instances, or `--degrees`); `--cpu-devices N` makes the
     CPU platform show N devices (`cpu_devices.use_cpu_devices`: it must act before JAX starts, so it is
     applied first).
  2. The flags become an `EngineConfig`, and `engine_config.build_executor` loads the checkpoint (default:
     the demo model) onto the devices exactly as `LLM` does; `ProfileBench` measures the grid block by block
     with a progress bar (compiles untimed, median of `--repetitions` interleaved runs).
  3. `fit_profile` fits the cost model; the fit quality (mean relative error per kind and overall, worst
     samples) is printed; the model is written to `--out` with metadata (machine, platform, model shape, date,
     command, grid, load average, fit error) and the raw samples to `--samples-out` if given. On one
     instance there is nothing to migrate: the model has no migration term, and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

from loong_jax.entrypoints.cli import CPU_DEVICES_HELP
from loong_jax.entrypoints.profiler import ProfileGrid


def profile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong-jax profile", description="Time the engine's prefill, decode "
                                     "and migration programs on the current devices and fit the cost model.")
    parser.add_argument("--model", default=None, help="checkpoint folder (Hugging Face files); default: demo model")
    parser.add_argument("--tp", type=int, default=1, help="devices per instance (tensor parallel)")
    parser.add_argument("--instances", type=int, default=None, help="instances (default: all devices / tp)")
    parser.add_argument("--degrees", default=None,
                        help="comma-separated degrees to measure (default: every aligned degree 1, 2, 4, ...)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--kv-pages", type=int, default=None, help="KV pages per instance (default: from memory)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="override the checkpoint dtype")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="N", help=CPU_DEVICES_HELP)
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds; for tests and smoke checks)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed runs per point (median kept)")
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply the grid's token counts (e.g. 32 for a 7B model on a GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--out", default="cost_model.json", help="the fitted cost-model JSON (default: %(default)s)")
    parser.add_argument("--samples-out", default=None, help="also write the raw samples here (JSON lines)")
    parser.add_argument("--name", default=None, help="name recorded in the file (default: from the model)")
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="JAX persistent compilation cache folder (default: the engine's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_degrees(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        degrees = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--degrees takes comma-separated integers, got {text!r}") from None
    if not degrees:
        raise argparse.ArgumentTypeError("--degrees is empty")
    return degrees


def grid_from_args(args: argparse.Namespace) -> ProfileGrid:
    grid = ProfileGrid.quick() if args.quick else ProfileGrid.full()
    if args.repetitions is not None:
        if args.repetitions < 1:
            raise argparse.ArgumentTypeError(f"--repetitions must be >= 1, got {args.repetitions}")
        grid = dataclasses.replace(grid, repetitions=args.repetitions)
    try:
        return grid.scaled(args.scale)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--scale: {error}") from None


def profile_main(argv: Sequence[str] | None = None, stdout=None) -> int:
    stdout = stdout or sys.stdout
    parser = profile_parser()
    args = parser.parse_args(argv)
    try:
        degrees = parse_degrees(args.degrees)
        grid = grid_from_args(args)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    from loong_jax.entrypoints.cpu_devices import use_cpu_devices

    try:
        use_cpu_devices(args.cpu_devices)
    except ValueError as error:
        parser.error(str(error))
    import jax

    from loong_jax.entrypoints.engine_config import (EngineConfig, build_executor, build_topology, load_checkpoint,
                                                     model_shape)
    from loong_jax.entrypoints.profiler import ProfileBench, degrees_for, fit_profile, fit_report, grid_blocks
    from loong_jax.executor.program_cache import DEFAULT_CACHE_DIR, enable_persistent_cache
    from loong_jax.scheduler.cost.model import sample_to_dict

    enable_persistent_cache(args.compilation_cache_dir or DEFAULT_CACHE_DIR)
    started, load_before = time.perf_counter(), os.getloadavg()
    try:
        config = EngineConfig(args.model, args.tp, args.instances, args.page_size, args.kv_pages, dtype=args.dtype)
        topology = build_topology(config.devices, config.tp, config.instances)
        executor = build_executor(config, load_checkpoint(config.model, config.dtype, config.scan_layers), topology)
        degrees = degrees_for(executor.num_instances, degrees)
    except (ValueError, FileNotFoundError) as error:
        print(f"loong-jax profile: error: {error}", file=sys.stderr)
        return 2
    try:
        bench = ProfileBench(executor, grid.repetitions, seed=args.seed)
        blocks = grid_blocks(grid, degrees, executor.num_instances, executor.pool_shape.pages, executor.page_size)
        samples = _measure(bench, blocks, grid.repetitions, progress=not args.no_progress)
    finally:
        executor.close()
    config, device = executor.config, executor.topology.devices[0]
    metadata = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": executor.num_instances * args.tp,
        "instances": executor.num_instances,
        "machine": {"host": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
        "model": args.model or "demo",
        "model_shape": model_shape(config),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "loong-jax profile " + " ".join(sys.argv[2:] if argv is None else argv),
        "grid": dataclasses.asdict(grid),
        "degrees": list(degrees),
        "profile_seconds": round(time.perf_counter() - started, 1),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "timing": "submit -> sampled tokens on the host (host input prep + dispatch + device), median of runs",
    }
    name = args.name or f"{config.model_type}_{device.platform}_{executor.num_instances}x{args.tp}"
    description = (f"{name}: measured on {metadata['devices']} {device.platform} device(s), "
                   f"{executor.num_instances} instances of tp={args.tp}")
    model = fit_profile(samples, bench, args.tp, description, metadata)
    for line in fit_report(model, samples).lines():
        print(line, file=stdout)
    if not model.has_migration:
        print("one instance: no migration measured, so the model has no migration term "
              "(it serves one instance only)", file=stdout)
    model.save_json(args.out, name=name)
    print(f"wrote {args.out} ({len(samples)} samples, {metadata['profile_seconds']} s)", file=stdout)
    if args.samples_out:
        Path(args.samples_out).write_text("".join(json.dumps(sample_to_dict(s)) + "\n" for s in samples))
        print(f"wrote {args.samples_out}", file=stdout)
    return 0


def _measure(bench, blocks, repetitions: int, progress: bool) -> list:
    from loong_jax.entrypoints.profiler import run_profile

    if not progress:
        return run_profile(bench, blocks)
    from tqdm.auto import tqdm

    runs = (1 + repetitions) * sum(len(block) for block in blocks)
    with tqdm(total=runs, desc="profiling", unit="run", disable=None) as bar:
        def advance(point) -> None:
            bar.set_postfix_str(str(point), refresh=False)
            bar.update(1)

        return run_profile(bench, blocks, on_run=advance)
