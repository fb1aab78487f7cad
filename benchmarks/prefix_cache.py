"""Prefix caching on the real engine: 8 questions on one long document, time to first token with and
without the cache, side by side in one run (8 simulated CPU devices, the shipped demo model by default).

Data flow:
  1. For each mode (prefix cache on, off) an `LLM` is built on the same 8 instances with the same policy
     (default ESP) and warmed up on another document of the same length (its first question and a second
     one, so the programs of both a whole prefill and a suffix prefill are compiled before anything is
     timed).
  2. The measured document: question 1 alone (it computes the document either way), then questions 2..N
     one at a time, each after the previous one finished; each question is the document's tokens followed
     by 16–40 question tokens. TTFT is the engine's own (`RequestMetrics.time_to_first_token`).
  3. Printed: TTFT per question in both modes and their ratio, the mean over questions 2..N, the cache's
     hit numbers, and whether the greedy tokens of both modes agree.

    python benchmarks/prefix_cache.py            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # 8 simulated devices, before JAX starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)

import numpy as np

from loong_jax.sampling.params import SamplingParams


def questions_on(document: list[int], count: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [document + rng.integers(5, vocab_size, size=int(rng.integers(16, 41))).tolist() for _ in range(count)]


def run_mode(prefix_caching: bool, args) -> dict:
    """TTFT (seconds) of each question on the measured document, with the greedy tokens and cache numbers."""
    from loong_jax.entrypoints.llm import LLM

    llm = LLM(args.model, policy=args.policy, page_size=args.page_size, prefix_caching=prefix_caching,
              warmup=True, progress=False)
    try:
        vocab = llm.config.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        rng = np.random.default_rng(args.seed)
        warm_document, document = (rng.integers(5, vocab, size=args.document_tokens).tolist() for _ in range(2))
        for prompt in questions_on(warm_document, 2, vocab, seed=args.seed + 1):  # compile, untimed
            llm.generate([prompt], params, use_tqdm=False)
        ttft, tokens, compiles, groups = [], [], [], []
        plans = _recorded_plans(llm)
        for prompt in questions_on(document, args.questions, vocab, seed=args.seed + 2):
            before = llm.snapshot().compiles
            plans.clear()
            (output,) = llm.generate([prompt], params, use_tqdm=False)
            ttft.append(output.metrics.time_to_first_token)
            tokens.append(output.outputs[0].token_ids)
            compiles.append(llm.snapshot().compiles - before)
            groups.append(next(b.group for plan in plans for b in plan.prefills))
        snapshot = llm.snapshot()
        return {"ttft": ttft, "tokens": tokens, "hits": snapshot.prefix_cache_hits, "compiles": compiles,
                "groups": groups, "hit_rate": snapshot.prefix_cache_hit_rate, "policy": snapshot.policy}
    finally:
        llm.close()


def _recorded_plans(llm) -> list:
    """The plans the engine's policy makes from now on (to name each question's prefill group)."""
    plans, core = [], llm.engine.core
    schedule = core.policy.schedule

    def recording(view):
        plans.append(schedule(view))
        return plans[-1]

    core.policy.schedule = recording  # an attribute of this policy object only: a fresh engine per mode
    return plans


def report(cached: dict, uncached: dict, args) -> list[str]:
    lines = [f"{args.questions} questions on one {args.document_tokens}-token document, policy {cached['policy']}, "
             f"page size {args.page_size}, {args.max_tokens} output tokens each",
             f"{'question':>8}  {'TTFT cache on (s)':>17}  {'TTFT cache off (s)':>18}  {'off / on':>8}  "
             "prefill group, compiles (on | off)"]
    for k, (on, off) in enumerate(zip(cached["ttft"], uncached["ttft"]), start=1):
        lines.append(f"{k:>8}  {on:>17.4f}  {off:>18.4f}  {off / on:>8.1f}  {cached['groups'][k - 1]}, "
                     f"{cached['compiles'][k - 1]} | {uncached['groups'][k - 1]}, {uncached['compiles'][k - 1]}")
    on, off = np.mean(cached["ttft"][1:]), np.mean(uncached["ttft"][1:])
    lines.append(f"questions 2..{args.questions}: mean TTFT {on:.4f} s with the cache, {off:.4f} s without: "
                 f"{off / on:.1f}x lower")
    lines.append(f"cache on: {cached['hits']} prefills reused cached pages, token hit rate "
                 f"{cached['hit_rate']:.1%} (warm-up included); greedy tokens identical in both modes: "
                 f"{cached['tokens'] == uncached['tokens']}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--policy", default="esp")
    parser.add_argument("--document-tokens", type=int, default=6000)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cached = run_mode(True, args)
    uncached = run_mode(False, args)
    for line in report(cached, uncached, args):
        print(line)
    print(f"({time.perf_counter() - started:.0f} s in all)")
    return 0 if cached["tokens"] == uncached["tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
