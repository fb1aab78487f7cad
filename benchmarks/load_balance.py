"""Load balance of ring prefill: causal attention work per group member for
striped vs contiguous token layouts.

The ring program computes full blocks, but the work that matters (and that a
block-sparse kernel would do) is the query-key pairs the mask lets through.
For each layout and each member this counts those pairs over the d ring steps,
using the same rule as the program (same segment, kv_pos <= q_pos), and prints
the max/mean ratio over members (1.0 = perfect balance).

Data flow:
  1. Build a prompt mix (seeded), lay it out over d members with
     `stripe_layout` (striped: token j of a prompt on member j mod d;
     contiguous: the packed stream cut into d equal runs).
  2. For member m and ring step s, count the unmasked pairs between m's
     queries and the KV block of member (m - s) mod d.
  3. Print per-member totals, max/mean, and the worst per-step ratio.

Run: python benchmarks/load_balance.py [--members 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from loong_jax.models.attention import attention_mask
from loong_jax.sharding.stripe_layout import (
    PackedLayout, build_layout, contiguous_members, striped_members)

STRIPED_LIMIT = 1.1


def unmasked_pairs(q_positions, q_segments, kv_positions, kv_segments) -> int:
    """Pairs with the same non-padding segment and kv_pos <= q_pos, counted by
    sorting (exactly `attention_mask(...).sum()`, without the [q, kv] matrix)."""
    live = kv_segments >= 0
    span = int(max(q_positions.max(initial=0), kv_positions.max(initial=0))) + 1
    kv_keys = np.sort(kv_segments[live].astype(np.int64) * span + kv_positions[live])
    q_live = q_segments >= 0
    q_keys = q_segments[q_live].astype(np.int64) * span
    upper = np.searchsorted(kv_keys, q_keys + q_positions[q_live], side="right")
    lower = np.searchsorted(kv_keys, q_keys, side="left")
    return int(np.sum(upper - lower))


def ring_work(layout: PackedLayout) -> np.ndarray:
    """[members, ring steps] unmasked query-key pairs member m computes at step s."""
    d, rows = layout.members, layout.rows_per_member
    pos = layout.positions.reshape(d, rows)
    seg = layout.segment_ids.reshape(d, rows)
    work = np.zeros((d, d), dtype=np.int64)
    for member in range(d):
        for step in range(d):
            source = (member - step) % d
            work[member, step] = unmasked_pairs(pos[member], seg[member], pos[source], seg[source])
    return work


def prompt_mixes(seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        "long-tail mix (24 prompts, log-uniform 1..32K)":
            np.exp(rng.uniform(0, np.log(32768), 24)).astype(int).clip(1).tolist(),
        "one 100K prompt": [100_000],
        "chat mix (200 prompts, 1..300)": rng.integers(1, 301, 200).tolist(),
        "tiny + long (lengths 1..7 and 3 long)": [1, 2, 3, 4, 5, 6, 7, 1, 1, 2, 9000, 20000, 4097],
    }


def check_counting_rule(members: int) -> None:
    """The sorted count equals the program's own mask on a small mix."""
    lengths = [1, 3, 8, 17, 2, 30]
    layout = build_layout(lengths, striped_members(lengths, members), members)
    pos, seg = layout.positions, layout.segment_ids
    by_mask = int(np.asarray(attention_mask(pos, seg, pos, seg)).sum())
    by_count = int(ring_work(layout).sum())
    assert by_mask == by_count == sum(n * (n + 1) // 2 for n in lengths), (by_mask, by_count)


def report(name: str, lengths: list[int], members: int) -> float:
    total_pairs = sum(n * (n + 1) // 2 for n in lengths)
    print(f"\n== {name}: {len(lengths)} prompts, {sum(lengths)} tokens, {total_pairs:.3e} causal pairs")
    striped_ratio = 0.0
    for layout_name, assign in (("striped", striped_members), ("contiguous", contiguous_members)):
        layout = build_layout(lengths, assign(lengths, members), members)
        work = ring_work(layout)  # [members, steps]
        per_member = work.sum(axis=1)
        assert per_member.sum() == total_pairs
        ratio = per_member.max() / per_member.mean()
        step_ratio = max((work[:, s].max() / work[:, s].mean()) for s in range(members) if work[:, s].any())
        tokens = np.bincount(assign(lengths, members), minlength=members)
        print(f"  {layout_name:10s} pairs per member: " + " ".join(f"{w:.3e}" for w in per_member))
        print(f"  {layout_name:10s} tokens per member: " + " ".join(str(t) for t in tokens))
        print(f"  {layout_name:10s} max/mean = {ratio:.4f}   (worst single ring step: {step_ratio:.4f})")
        if layout_name == "striped":
            striped_ratio = ratio
    return striped_ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_counting_rule(args.members)
    worst = max(report(name, lengths, args.members) for name, lengths in prompt_mixes(args.seed).items())
    verdict = "OK" if worst <= STRIPED_LIMIT else "FAIL"
    print(f"\nstriped worst max/mean over mixes = {worst:.4f} (limit {STRIPED_LIMIT}): {verdict}")
    return 0 if worst <= STRIPED_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
