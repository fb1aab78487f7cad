"""The faster forms of the ESP snapshot's helpers give what the plain definitions give, on random clusters:
`estimate_wait` (drain per instance instead of a scan of every home per instance), `fits_free_instances`
(the free blocks' sub-groups instead of the whole family), `decoding_per_instance` (counted once per
snapshot), `outermost_groups` (by first instance instead of subset tests), the cached `free_blocks`, and
the median latency `OfferedLoad` keeps until the next arrival."""

import math
import random

import pytest

from loong_jax.scheduler.esp.dispatch import ClusterSnapshot, estimate_wait
from loong_jax.scheduler.esp.queue import OfferedLoad, fits_free_instances, head_pages
from loong_jax.scheduler.groups import aligned_groups, free_blocks, outermost_groups

from tests.scheduler.helpers import decoding, instances, synthetic_cost, view, waiting


def random_snapshot(rng: random.Random, n: int) -> ClusterSnapshot:
    busy = {i for i in range(n) if rng.random() < 0.3}
    cluster = instances([rng.randint(0, 1000) for _ in range(n)], busy=busy, busy_for=rng.uniform(0.1, 5))
    requests = []
    for k in range(rng.randint(0, 3 * n)):
        size = rng.choice([1, 1, 1, 2, 4])
        start = rng.randrange(0, n - size + 1, size)
        kv = {i: rng.randint(1, 300) for i in range(start, start + size)}
        generated = rng.randint(1, 50)
        requests.append(decoding(f"d{k}", k, kv, master=rng.choice(list(kv)), generated=generated,
                                 max_new_tokens=generated + rng.randint(0, 200), in_flight=rng.random() < 0.2))
    state = view(cluster, waiting(*[rng.randint(10, 40_000) for _ in range(5)]), requests,
                 cost=synthetic_cost(max_dop=n), now=1.0)
    return ClusterSnapshot.build(state, 512)


def wait_from_scratch(snapshot: ClusterSnapshot) -> float:
    view, cost = snapshot.view, snapshot.view.cost_model
    members: dict = {}
    for request in view.decoding:
        members.setdefault(snapshot.homes[request.request_id], []).append(request)
    drain_by_home = {home: max(r.remaining_new_tokens(view.default_output_tokens) for r in rs)
                     * cost.decode_time(len(home), len(rs), sum(r.context_len for r in rs))
                     for home, rs in members.items()}
    best = math.inf
    for instance in view.instances:
        if instance.index in snapshot.free:
            continue
        until = max(0.0, instance.busy_until - view.now) if instance.busy else 0.0
        covering = [t for home, t in drain_by_home.items() if instance.index in home]
        if covering:
            until = max(until, max(covering))
        elif not instance.busy:
            continue
        best = min(best, until)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_snapshot_helpers_match_their_plain_definitions(seed):
    rng = random.Random(seed)
    snapshot = random_snapshot(rng, rng.choice([4, 8, 16]))
    assert estimate_wait(snapshot) == wait_from_scratch(snapshot)
    counts: dict = {}
    for home in snapshot.homes.values():
        for instance in home:
            counts[instance] = counts.get(instance, 0) + 1
    assert snapshot.decoding_per_instance() == counts
    sizes = snapshot.prefill_sizes()
    for head in snapshot.view.waiting:
        _, need = head_pages(snapshot, head)
        from_scratch = any(len(g) in sizes and snapshot.free.issuperset(g)
                           and sum(snapshot.usable_pages(i) for i in g) >= need
                           for g in aligned_groups(snapshot.view.num_instances))
        assert fits_free_instances(snapshot, head) == from_scratch


def test_free_blocks_hands_out_a_fresh_list_each_time():
    blocks = free_blocks({0, 1, 2, 3, 5}, 8)
    assert blocks == [(0, 1, 2, 3), (5,)]
    blocks.clear()  # a caller changing its list does not change the next answer
    assert free_blocks([5, 3, 2, 1, 0], 8) == [(0, 1, 2, 3), (5,)]
    assert free_blocks(range(6), 6) == [tuple(range(6))]  # the whole cluster (not a power of two)


def test_typical_latency_follows_new_arrivals():
    rng = random.Random(0)
    snapshot = random_snapshot(rng, 4)
    load = OfferedLoad(window=8)
    seq = 0
    for _ in range(6):
        arrivals = waiting(*[rng.randint(10, 40_000) for _ in range(3)], start_seq=seq)
        seq += len(arrivals)
        load.observe(snapshot, list(arrivals))
        latencies = sorted(isolated for _, _, isolated in load._arrivals)
        assert load.typical_latency() == latencies[len(latencies) // 2]


@pytest.mark.parametrize("n", [6, 8, 16])
def test_outermost_groups_match_subset_tests(n):
    rng = random.Random(n)
    family = aligned_groups(n)
    for _ in range(50):
        groups = rng.sample(family, rng.randint(1, len(family)))
        ordered = sorted(groups, key=lambda g: (-len(g), g))
        outer: list = []
        for group in ordered:  # the plain definition: the first wider group taken so far that holds it
            if not any(set(group) <= set(g) for g in outer):
                outer.append(group)
        expected = {g: next(o for o in outer if set(g) <= set(o)) for g in ordered}
        assert list(outermost_groups(groups).items()) == list(expected.items())
