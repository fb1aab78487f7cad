"""The ESP hot paths' faster forms give exactly what their plain definitions give, on random clusters:
decoding requests weighed in one pass (`ClusterSnapshot._weigh`) and each decode group's urgency
once per snapshot (`group_urgency`); the free instances' option kept from the first `choose_prefill`
(`PrefillChoice.free_only`) instead of a second call; consolidation's pages counted in one pass
(`_pages_moving`) and the roomiest one-instance target found once; `defer_seconds` memoised; placement's
one-member choice without a key per member (`_roomiest_single`). And the benchmark's serving mode really
changes the state between timed calls."""

import importlib.util
import math
import random
from pathlib import Path

import pytest

from loong_jax.scheduler.esp.allocation import (
    BatchingLimits, _pages_asked_of, _pages_moving, choose_prefill, plan_consolidation,
)
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot, admit_by_pages
from loong_jax.scheduler.esp.scaling import _roomiest_single
from loong_jax.scheduler.decode_planner import home_group
from loong_jax.scheduler.groups import covering_group
from loong_jax.scheduler.plan import Migration
from loong_jax.scheduler.policy import make_policy

from tests.scheduler.helpers import PAGE, decoding
from tests.scheduler.test_snapshot_shortcuts import random_snapshot

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduler_speed.py"


def plain_urgency(snapshot: ClusterSnapshot, request) -> float:
    """The definition: slack to slo_scale x isolated latency, what is left being the remaining output at one
    decode step alone on one instance (decoding) or the isolated latency (waiting)."""
    view = snapshot.view
    isolated = snapshot.isolated(request)
    budget = snapshot.slo_scale * isolated
    if request.kv and request.master is not None:
        remaining = (request.remaining_new_tokens(view.default_output_tokens)
                     * view.cost_model.decode_time(1, 1, request.context_len))
    else:
        remaining = isolated
    slack = budget - (view.now - request.arrival) - remaining
    return 1.0 / budget if slack <= 0 else 1.0 / min(slack, budget)


@pytest.mark.parametrize("seed", range(20))
def test_urgency_in_one_pass_matches_the_definition(seed):
    rng = random.Random(seed)
    n = rng.choice([4, 8, 16])
    grouped = random_snapshot(random.Random(seed), n)
    alone = random_snapshot(random.Random(seed), n)  # the same cluster, weighed one request at a time
    for group, requests in grouped.decode_groups.items():
        expected = 0.0
        for request in requests:
            expected += plain_urgency(alone, request)
        assert grouped.group_urgency(group) == expected
    for request in list(alone.view.decoding) + list(alone.view.waiting):
        assert alone.urgency([request]) == plain_urgency(alone, request)
        assert grouped.urgency([request]) == plain_urgency(alone, request)


@pytest.mark.parametrize("seed", range(30))
def test_free_only_option_is_what_the_free_instances_alone_choose(seed):
    rng = random.Random(seed)
    snapshot = random_snapshot(rng, rng.choice([4, 8, 16]))
    queue = list(snapshot.view.waiting)
    limits = BatchingLimits()
    choice = choose_prefill(snapshot, queue, limits, max_lent_groups=8, nothing_running=False)
    again = choose_prefill(snapshot, queue, limits, max_lent_groups=0, nothing_running=False).best
    if again is None:
        assert choice.free_only is None
        return
    kept = choice.free_only
    assert (kept.instances, kept.lent_groups, kept.batching, kept.cost, kept.lend_cost) == (
        again.instances, again.lent_groups, again.batching, again.cost, again.lend_cost)
    assert [r.request_id for r in kept.admitted] == [r.request_id for r in again.admitted]


def consolidation_from_scratch(snapshot: ClusterSnapshot, waiting, limits: BatchingLimits, lend_cost,
                               across_singles: bool) -> list[Migration]:
    """`plan_consolidation` as first written: every sum over the moving requests taken on its own, every
    one-instance target compared for each source."""
    view = snapshot.view
    n, page_size, cost = view.num_instances, view.page_size, view.cost_model
    wait = snapshot.wait()
    best_net, best_moves = 0.0, []
    singles = [g[0] for g in snapshot.decode_groups if len(g) == 1] if across_singles else []
    needs = [snapshot.pages_for_prompt(r) for r in waiting]

    def queue_gain(freed: int) -> float:
        return snapshot.urgency(waiting[k] for k in admit_by_pages(needs, freed, freed, limits.max_admit,
                                                                   limits.backfill))

    def frees(requests, moving, x, y) -> bool:
        for request in requests:
            if request in moving:
                instances = (set(request.kv) - {x}) | {y, y if request.master == x else request.master}
                home = covering_group(instances, n)
            else:
                home = home_group(request, n)
            if x in home:
                return False
        return True

    for group, requests in snapshot.decode_groups.items():
        delayed = snapshot.urgency(requests)
        for x in group:
            moving = [r for r in requests if x in r.kv]
            if not moving:
                continue
            seconds = cost.migration_time(sum(r.kv[x] for r in moving))
            if lend_cost is None and wait <= seconds:
                continue
            if len(group) > 1:
                targets = [(y, 0.0) for y in group if y != x]
            else:
                targets = [(y, snapshot.urgency(snapshot.decode_groups[(y,)])) for y in singles if y != x]
                targets = [max(targets, key=lambda t: snapshot.usable_pages(t[0]))] if targets else []
            for y, also_delayed in sorted(targets, key=lambda t: -snapshot.usable_pages(t[0])):
                if len(group) > 1 and not frees(requests, moving, x, y):
                    continue
                need = sum(-(-(r.kv.get(y, 0) + r.kv[x]) // page_size) - (-(-r.kv.get(y, 0) // page_size))
                           for r in moving)
                need += sum(-(-snapshot.growth(r) // page_size) for r in moving if r.master == x)
                if need > snapshot.usable_pages(y):
                    continue
                freed = snapshot.pages_free[x] + sum(-(-r.kv[x] // page_size) for r in moving)
                if lend_cost is None:
                    net = queue_gain(freed) * (wait - seconds) - seconds * (delayed + also_delayed)
                else:
                    net = lend_cost - seconds * (delayed + also_delayed + queue_gain(freed))
                if net > best_net:
                    best_net = net
                    best_moves = [Migration(r.request_id, x, y, r.kv[x], estimated_s=cost.migration_time(r.kv[x]))
                                  for r in moving]
                break
    return best_moves


@pytest.mark.parametrize("seed", range(40))
def test_consolidation_matches_its_plain_definition(seed):
    rng = random.Random(seed)
    n = rng.choice([4, 8, 16])
    limits = BatchingLimits()
    for lend_cost in (None, rng.uniform(0.0, 50.0)):
        for across_singles in (True, False):
            fast = random_snapshot(random.Random(seed), n)
            plain = random_snapshot(random.Random(seed), n)
            queue = list(fast.view.waiting)
            assert plan_consolidation(fast, queue, limits, lend_cost, across_singles) == consolidation_from_scratch(
                plain, list(plain.view.waiting), limits, lend_cost, across_singles)


def test_defer_seconds_is_memoised_per_request_and_arguments():
    snapshot = random_snapshot(random.Random(3), 8)
    request = snapshot.view.waiting[0]
    first = snapshot.defer_seconds(request, 0.5, 4.0, 8)
    assert snapshot.defer_seconds(request, 0.5, 4.0, 8) == first
    other = snapshot.defer_seconds(request, 0.25, 4.0, 8)  # another wait is another value, not the memo
    fresh = random_snapshot(random.Random(3), 8)
    assert other == fresh.defer_seconds(fresh.view.waiting[0], 0.25, 4.0, 8)
    assert math.isinf(snapshot.defer_seconds(request, 0.5, 0.0, 8))  # waited past 0 x its latency


def load_benchmark():
    spec = importlib.util.spec_from_file_location("scheduler_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_serving_mode_advances_the_state_and_fixed_mode_does_not():
    bench = load_benchmark()
    from loong_jax.scheduler.cost.model import CostModel
    cost = CostModel.load_json(None, tp=1)

    def run(advance: bool):
        state = bench.build_state(cost, 8, tuple(range(6)), num_waiting=40, num_decoding=24, seed=0)
        before = {r.request_id: r.num_generated for r in state.decoding.values()}
        waiting_before = [r.request_id for r in state.waiting]
        timer = bench.Timer(make_policy("esp"), state, cost, advance=advance)
        timer.run(6)
        return state, before, waiting_before, timer

    state, before, waiting_before, timer = run(advance=False)
    assert {r.request_id: r.num_generated for r in state.decoding.values()} == before
    assert [r.request_id for r in state.waiting] == waiting_before and timer.now == 1_000.0

    state, before, waiting_before, timer = run(advance=True)
    grown = [rid for rid, generated in before.items() if state.requests[rid].num_generated > generated]
    assert len(grown) >= len(before) // 2  # decodes ran through real plans and results
    arrivals = [r.request_id for r in state.waiting if r.request_id.startswith("arrival-")]
    assert len(arrivals) == 6 and timer.now > 1_000.0
    assert [r.finish_reason for r in state.requests.values()].count("abort") == 1  # the fifth call's leave
    state.check_invariants()


@pytest.mark.parametrize("seed", range(20))
def test_roomiest_single_member_is_the_best_key(seed):
    rng = random.Random(seed)
    page_size = 16
    for _ in range(50):
        group = tuple(range(rng.choice([1, 2, 4, 8, 16])))
        usable = {i: rng.choice([0, 1, 5, 5, 40, rng.randint(0, 100)]) for i in group}
        free = {i for i in group if rng.random() < 0.5}
        tokens = rng.randint(1, 1_000)
        best, best_key = None, None  # the key form: (holds decodes, usable pages), first among equals
        for i in group:
            if usable[i] * page_size >= tokens:
                key = (i not in free, usable[i])
                if best_key is None or key > best_key:
                    best, best_key = i, key
        assert _roomiest_single(group, usable, free, -(-tokens // page_size)) == best


@pytest.mark.parametrize("seed", range(20))
def test_pages_a_consolidation_target_takes_match_the_plain_sum(seed):
    rng = random.Random(seed)
    page_size, x, y = PAGE, 0, 1  # the page size of `random_snapshot`'s cluster
    snapshot = random_snapshot(random.Random(seed), 4)
    for _ in range(50):
        shares = [{x: rng.randint(1, 70)} for _ in range(rng.randint(1, 6))]
        for share in shares:
            if rng.random() < 0.5:  # part of the request already lives on y
                share[y] = rng.randint(1, 70)
        moving = [decoding(f"d{k}", k, share, master=x) for k, share in enumerate(shares)]
        pages_on_x, _ = _pages_moving(moving, x, snapshot)
        plain = sum(-(-(r.kv.get(y, 0) + r.kv[x]) // page_size) - (-(-r.kv.get(y, 0) // page_size)) for r in moving)
        assert _pages_asked_of(y, moving, x, pages_on_x, page_size) == plain
