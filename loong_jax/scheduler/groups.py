"""The fixed family of instance groups: aligned power-of-two runs over the instance order.

Why a fixed family: every (kind, group, bucket) is a compiled program, so the groups a policy may use must be
few. Aligned runs of 2^k instances ({0},{1},..,{0,1},{2,3},..,{0..3},{4..7},{0..7}) give 2N-1 groups for N
instances, and any two of them are either disjoint or nested — which keeps merging and packing simple:
  1. `aligned_groups(n)` lists the family (plus the whole cluster when n is not a power of two).
  2. `covering_group(instances, n)` is the smallest family group containing a set (a decode group).
  3. `free_blocks(free, n)` splits a set of instances into maximal family groups it fully contains.
  4. `outermost_groups(groups)` maps each group to the widest one containing it (decode batches).
  5. `pack_sizes(sizes, blocks)` places power-of-two group sizes into those blocks (largest first), which
     succeeds exactly when for every size s the demand of sizes >= s fits in the blocks of size >= s.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

Group = tuple[int, ...]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def power_of_two_sizes(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n."""
    sizes, size = [], 1
    while size <= n:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


@lru_cache(maxsize=64)
def aligned_groups(num_instances: int) -> tuple[Group, ...]:
    """Every group of the family, smallest first."""
    groups = [
        tuple(range(start, start + size))
        for size in power_of_two_sizes(num_instances)
        for start in range(0, num_instances - size + 1, size)
    ]
    if not is_power_of_two(num_instances):
        groups.append(tuple(range(num_instances)))
    return tuple(groups)


def aligned_block(instance: int, size: int) -> Group:
    start = instance - instance % size
    return tuple(range(start, start + size))


def covering_group(instances: Iterable[int], num_instances: int) -> Group:
    """Smallest family group containing every given instance."""
    members = set(instances)
    if not members:
        raise ValueError("covering_group of no instances")
    low, high = min(members), max(members)
    size = 1
    while size <= num_instances:
        if low // size == high // size and (low // size + 1) * size <= num_instances:
            return aligned_block(low, size)
        size *= 2
    return tuple(range(num_instances))


def parent_group(group: Group, num_instances: int) -> Group | None:
    """The family group of twice the size containing `group` (None at the top)."""
    if len(group) >= num_instances:
        return None
    parent = covering_group(list(group) + [group[0] ^ len(group)], num_instances)
    return parent if len(parent) > len(group) else None


def free_blocks(free: Iterable[int], num_instances: int) -> list[Group]:
    """Maximal family groups fully inside `free`, largest first (ties by position)."""
    return list(_free_blocks(frozenset(free), num_instances))


@lru_cache(maxsize=4096)
def _free_blocks(free_set: frozenset, num_instances: int) -> tuple[Group, ...]:
    """`free_blocks`, cached: a policy asks for the same few sets many times per step and across steps."""
    if len(free_set) == num_instances and not is_power_of_two(num_instances):
        return (tuple(range(num_instances)),)
    blocks: list[Group] = []
    covered: set[int] = set()
    for size in reversed(power_of_two_sizes(num_instances)):
        for start in range(0, num_instances - size + 1, size):
            block = tuple(range(start, start + size))
            if not covered.intersection(block) and free_set.issuperset(block):
                blocks.append(block)
                covered.update(block)
    return tuple(blocks)


def outermost_groups(groups: Iterable[Group]) -> dict[Group, Group]:
    """Each of `groups` (family groups) -> the widest of them containing it, itself if none does; keys
    widest first (ties by position), so the outer groups come in that order too. Family groups are nested
    or disjoint: a group lies inside a wider one exactly when its first instance does."""
    outer_of: dict[Group, Group] = {}
    outer_by_instance: dict[int, Group] = {}
    for group in sorted(groups, key=lambda g: (-len(g), g)):
        outer = outer_by_instance.get(group[0])
        if outer is None:
            outer = group
            for instance in group:
                outer_by_instance[instance] = group
        outer_of[group] = outer
    return outer_of


def pack_sizes(sizes: Sequence[int], blocks: Sequence[Group]) -> list[Group] | None:
    """Disjoint groups of the requested sizes inside `blocks`, in the order of `sizes`; None if impossible.

    Largest sizes go first; each takes the leftmost free aligned run of its size in the first block
    (largest block first) that still has one.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    used: set[int] = set()
    result: list[Group | None] = [None] * len(sizes)
    ordered_blocks = sorted(blocks, key=lambda b: (-len(b), b[0]))
    for index in order:
        size = sizes[index]
        chosen = None
        for block in ordered_blocks:
            if len(block) < size:
                continue
            if len(block) == size:
                candidates = [block]
            else:
                candidates = [block[k:k + size] for k in range(0, len(block), size)]
            for candidate in candidates:
                if len(candidate) == size and not used.intersection(candidate):
                    chosen = candidate
                    break
            if chosen:
                break
        if chosen is None:
            return None
        used.update(chosen)
        result[index] = chosen
    return result  # type: ignore[return-value]


def capacity_by_threshold(blocks: Sequence[Group], sizes: Sequence[int]) -> dict[int, int]:
    """For each size s: instances in blocks of length >= s (the packing bound used by the batching DP)."""
    return {s: sum(len(b) for b in blocks if len(b) >= s) for s in sizes}
