"""Peer comparison on CPU: the demo checkpoint served by `transformers` generate vs loong_jax's `LLM.generate`.

    python benchmarks/peer_transformers.py --json benchmarks/results/peer_transformers.json

Data flow:
  1. Prompts: 64 windows of the demo corpus (the stdlib docstrings the demo model was trained on) with
     lengths drawn log-uniformly in [--min-len, --max-len] tokens, each starting with BOS; both engines get
     the very same token ids.
  2. transformers: `AutoModelForCausalLM.from_pretrained(folder)` in float32, `generate` on batches of
     `--hf-batch-size` prompts (left padding, attention mask, greedy, stop at the checkpoint's EOS ids).
     loong_jax: `LLM(folder).generate(prompts, SamplingParams(temperature=0, max_tokens=...))` (continuous
     batching inside the engine).
  3. Each side runs once untimed (compiles, allocator warm-up), then `--repeats` timed runs; reported
     output tokens/s = generated tokens (up to and including EOS) / the best wall time, in one process on
     one machine, one after the other.
  4. The outputs are compared token for token (each cut after its first EOS): the number of identical
     completions and, for the others, where they first differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def corpus_prompts(tokenizer, count: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """`count` token windows of the demo corpus, lengths log-uniform in [min_len, max_len], BOS first."""
    from loong_jax.models.demo_corpus import collect_documents

    rng = np.random.default_rng(seed)
    documents = collect_documents()
    order = rng.permutation(len(documents))
    stream: list[int] = []
    for index in order:  # enough text for every window to come from a different place
        stream += tokenizer.encode(documents[index].text, add_special_tokens=False)
        if len(stream) > 4 * count * max_len:
            break
    lengths = np.exp(rng.uniform(np.log(min_len), np.log(max_len), size=count)).astype(int)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = []
    for length in lengths:
        start = int(rng.integers(0, len(stream) - length))
        prompts.append(bos + stream[start:start + int(length) - len(bos)])
    return prompts


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    out = []
    for token in tokens:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def run_transformers(folder: Path, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     eos_ids: list[int], pad_id: int) -> list[list[int]]:
    import torch
    import transformers

    model = getattr(run_transformers, "model", None)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        run_transformers.model = model
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            generated = model.generate(input_ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
        outputs += [cut_at_eos(row[width:].tolist(), set(eos_ids)) for row in generated]
    return outputs


def run_loong(llm, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
    from loong_jax.sampling.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    results = llm.generate(prompts, params, use_tqdm=False)
    return [cut_at_eos(r.token_ids, set(eos_ids)) for r in results]


def best_time(run, repeats: int, warm_up: bool = True) -> tuple[float, list]:
    if warm_up:
        run()  # untimed: compiles and warms up
    best, outputs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = run()
        best = min(best, time.perf_counter() - start)
    return best, outputs


def compare(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    identical, first_differences = 0, []
    for ours, theirs in zip(candidate, reference):
        if ours == theirs:
            identical += 1
            continue
        common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        first_differences.append(common)
    return {"identical": identical, "total": len(reference), "first_difference_positions": first_differences}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="prompts per transformers generate call")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (best reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import jax

    from loong_jax.entrypoints.llm import LLM
    from loong_jax.models.demo import resolve_model_path
    from loong_jax.models.tokenizer import Tokenizer

    folder = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_dir(folder)
    eos_ids = list(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = corpus_prompts(tokenizer, args.num_prompts, args.min_len, args.max_len, args.seed)

    hf_seconds, hf_outputs = best_time(
        lambda: run_transformers(folder, prompts, args.max_new_tokens, args.hf_batch_size, eos_ids, pad_id),
        args.repeats)
    llm = LLM(folder, progress=False)
    loong_run = lambda: run_loong(llm, prompts, args.max_new_tokens, eos_ids)  # noqa: E731
    loong_run()  # untimed: compiles what this workload needs
    compiles_before_timing = llm.stats().get("programs_compiles")
    loong_seconds, loong_outputs = best_time(loong_run, args.repeats, warm_up=False)
    compiles_during_timing = llm.stats().get("programs_compiles", 0) - (compiles_before_timing or 0)
    hf_tokens = sum(len(o) for o in hf_outputs)
    loong_tokens = sum(len(o) for o in loong_outputs)
    import torch

    report = {
        "machine": {"cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "platform": platform.platform(), "jax_devices": [str(d) for d in jax.devices()],
                    "torch_threads": torch.get_num_threads()},
        "model": str(folder), "num_prompts": len(prompts),
        "prompt_lengths": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                           "mean": float(np.mean([len(p) for p in prompts]))},
        "max_new_tokens": args.max_new_tokens, "hf_batch_size": args.hf_batch_size,
        "transformers": {"seconds": hf_seconds, "output_tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_seconds},
        "loong_jax": {"seconds": loong_seconds, "output_tokens": loong_tokens,
                      "tokens_per_s": loong_tokens / loong_seconds,
                      "programs_compiled_before_timing": compiles_before_timing,
                      "programs_compiled_during_timing": compiles_during_timing},
        "comparison": compare(hf_outputs, loong_outputs),
    }
    report["speedup"] = report["loong_jax"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
    llm.close()
    print(f"{'':<14}{'seconds':>10}{'tokens':>10}{'tokens/s':>12}")
    for side in ("transformers", "loong_jax"):
        row = report[side]
        print(f"{side:<14}{row['seconds']:>10.2f}{row['output_tokens']:>10}{row['tokens_per_s']:>12.1f}")
    comparison = report["comparison"]
    print(f"loong_jax / transformers: {report['speedup']:.2f}x; identical completions "
          f"{comparison['identical']}/{comparison['total']}; load average {report['machine']['load_average']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
