"""Compile seconds of the engine's prefill and decode programs against model depth (issue #16 item 8).

The demo model's shape (hidden 256, 8 heads / 2 kv heads, head_dim 32, vocab 4096) with 4, 8, 16 ... layers
and random weights on one device, through `gpu_h200.ModelBench` (the engine's programs, greedy sampler fused,
d = 1, XLA reference attention): a prefill of 128 tokens and a decode step of 4 rows x 64 tokens of context.
Each program is lowered and compiled once, ahead of time, with no persistent compilation cache; a line of
JSON per depth: {"layers", "prefill_compile_s", "decode_compile_s", "scan_layers"}. `--unrolled` builds the
model with `ModelConfig.scan_layers=False` (one copy of the layer's code per layer) to compare.

    python benchmarks/compile_depth.py 4 8 16 [--unrolled]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules
from gpu_h200 import TINY_SETTINGS, ModelBench  # noqa: E402
from loong_jax.models.config import ModelConfig  # noqa: E402
from loong_jax.models.demo import DEMO_MODEL_DIR  # noqa: E402
from loong_jax.models.kernels.dispatch import REFERENCE  # noqa: E402

PREFILL_LENGTHS = (128,)
DECODE_ROWS, DECODE_CONTEXT = 4, 64


def compile_seconds(layers: int, scan_layers: bool) -> dict:
    config = dataclasses.replace(ModelConfig.from_json(DEMO_MODEL_DIR), num_layers=layers)
    if scan_layers is False:  # a checkout without the option has only the unrolled loop
        config = config.with_scan_layers(False)
    settings = dataclasses.replace(TINY_SETTINGS, config=config,
                                   model_decode_capacity=(DECODE_ROWS, DECODE_CONTEXT))
    bench = ModelBench(settings, jax.devices()[0], REFERENCE)
    bench._program("prefill", bench.prefill_program, *bench.prefill_args(PREFILL_LENGTHS))
    bench._program("decode", bench.decode_program, *bench.decode_args(DECODE_ROWS, DECODE_CONTEXT))
    return {"layers": layers, "prefill_compile_s": round(bench.compile_seconds["prefill"], 2),
            "decode_compile_s": round(bench.compile_seconds["decode"], 2),
            "scan_layers": getattr(config, "scan_layers", False)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layers", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--unrolled", action="store_true", help="ModelConfig.scan_layers=False")
    args = parser.parse_args()
    for depth in args.layers:
        print(json.dumps(compile_seconds(depth, scan_layers=not args.unrolled)), flush=True)
