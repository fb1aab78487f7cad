"""Plans round-trip through JSON and check themselves; the group family packs and covers as promised."""

import itertools
import json

import pytest

from loong_jax.scheduler.groups import (
    aligned_groups, capacity_by_threshold, covering_group, free_blocks, pack_sizes, parent_group,
)
from loong_jax.scheduler.plan import DecodeBatch, Migration, Plan, Preemption, PrefillBatch


def full_plan() -> Plan:
    prefill = PrefillBatch((0, 1, 2, 3), ("a", 7), ((0, 100), (0, 30)), (((0, 64), (1, 36)), ((2, 30),)), 0.5)
    chunk = PrefillBatch((4, 5), ("c",), ((64, 32),), (((4, 16), (5, 16)),))
    decode = DecodeBatch((4, 5), ("d", "e"), (4, 5), fused_prefill=chunk, estimated_s=0.01)
    return Plan(
        prefills=(prefill,), decodes=(decode,),
        migrations=(Migration("f", 6, 7, 48, 0.001), Migration("g", 6, 7, 16)),
        preemptions=(Preemption("h"),), rejections=("i",),
    )


def test_plan_round_trips_through_json():
    plan = full_plan()
    wire = json.dumps(plan.to_dict())
    assert Plan.from_dict(json.loads(wire)) == plan
    assert plan.prefills[0].kept_instances == (0, 1, 2) and plan.prefills[0].leaving_instances == (3,)


def test_work_units_group_migrations_by_pair():
    units = list(full_plan().work_units())
    migration = units[0]
    assert migration.group == (6, 7) and migration.request_ids == ("f", "g") and migration.num_tokens == 64
    assert len(units) == 3


@pytest.mark.parametrize("make", [
    lambda: PrefillBatch((0, 1), ("a",), ((0, 10),), (((0, 9),),)),  # placement does not cover the chunk
    lambda: PrefillBatch((0, 1), ("a",), ((0, 10),), (((2, 10),),)),  # placement outside the group
    lambda: PrefillBatch((0, 0), ("a",), ((0, 10),), (((0, 10),),)),  # repeated member
    lambda: DecodeBatch((0, 1), ("a",), (2,)),  # master outside the group
    lambda: Migration("a", 1, 1, 5),
])
def test_malformed_plan_pieces_raise(make):
    with pytest.raises(ValueError):
        make()


def test_family_cover_and_parent():
    assert len(aligned_groups(8)) == 15
    assert covering_group([2], 8) == (2,)
    assert covering_group([2, 3], 8) == (2, 3)
    assert covering_group([1, 2], 8) == (0, 1, 2, 3)
    assert covering_group([3, 4], 8) == tuple(range(8))
    assert parent_group((2, 3), 8) == (0, 1, 2, 3) and parent_group(tuple(range(8)), 8) is None
    assert aligned_groups(6)[-1] == tuple(range(6)) and covering_group([3, 4], 6) == tuple(range(6))


def test_free_blocks_are_maximal_aligned_runs():
    assert free_blocks([0, 1, 2, 3, 5, 6, 7], 8) == [(0, 1, 2, 3), (6, 7), (5,)]
    assert free_blocks([1, 2], 8) == [(1,), (2,)]


def brute_force_packable(sizes, free, n):
    groups = [g for g in aligned_groups(n) if set(g) <= set(free)]
    for choice in itertools.product(groups, repeat=len(sizes)):
        if all(len(g) == s for g, s in zip(choice, sizes)):
            used = [i for g in choice for i in g]
            if len(used) == len(set(used)):
                return True
    return False


def test_pack_sizes_matches_brute_force_and_threshold_rule():
    for free in [(0, 1, 2, 3, 5, 6, 7), (1, 2, 4, 5), (0, 2, 4, 6), tuple(range(8)), (3, 4, 5, 6, 7)]:
        blocks = free_blocks(free, 8)
        for k in range(1, 5):
            for sizes in itertools.combinations_with_replacement([1, 2, 4, 8], k):
                packed = pack_sizes(list(sizes), blocks)
                expected = brute_force_packable(sizes, free, 8)
                assert (packed is not None) == expected, (free, sizes)
                thresholds = capacity_by_threshold(blocks, [1, 2, 4, 8])
                rule = all(sum(x for x in sizes if x >= s) <= thresholds[s] for s in (1, 2, 4, 8))
                assert rule == expected, (free, sizes)
                if packed:
                    assert [len(g) for g in packed] == list(sizes)
                    assert all(set(g) <= set(free) for g in packed)
