"""ESP, step by step, on hand-made cluster states: who is admitted, which instances prefill, which group and
placement, scale-up, preemption, consolidation by migration, compile-aware group choice; then whole runs."""

import json
import random
from collections import Counter

from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.esp.policy import EspPolicy
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot, admit_fifo
from loong_jax.scheduler.plan import Plan, PrefillBatch
from loong_jax.scheduler.view import power_of_two_bucket

from tests.scheduler.driver import drive
from tests.scheduler.helpers import decoding, instances, synthetic_cost, view, waiting


def prefill_map(plan):
    """request id -> (group, placement)"""
    return {rid: (b.group, seg) for b in plan.prefills for rid, seg in zip(b.request_ids, b.placement)}


def test_dispatch_backfills_past_a_request_that_does_not_fit():
    # Two free instances of 100 pages (3,200 slots): w0 (800 + growth) fits, w1 (3,000 + growth) does not.
    free_only = instances([0] * 6 + [100, 100], busy=range(6))
    young = view(free_only, waiting(800, 3000, 100, 50), now=1.0)
    snapshot = ClusterSnapshot.build(young, growth_horizon=512)
    admitted = admit_fifo(snapshot, young.waiting, 200, 200, 100)
    assert [r.request_id for r in admitted] == ["w0", "w2", "w3"]  # w1 is passed over, the others use the room
    assert set(prefill_map(EspPolicy().schedule(young))) >= {"w2", "w3"}
    # Overtaking is bounded by the head's reservation (tests/scheduler/test_esp_queue.py), not by admission.


def test_dispatch_reserves_decode_growth():
    # 3 decodes mastered on 6 will grow by up to 999 tokens each, capped at the growth horizon (512 tokens =
    # 32 pages; their last pages are full): 96 of 6's 100 free pages are kept for them.
    decodes = [decoding(f"d{k}", 100 + k, {6: 32}, 6, max_new_tokens=1000) for k in range(3)]
    state = view(instances([0] * 6 + [100, 100], busy=range(6)), waiting(800, 1000), decodes)
    snapshot = ClusterSnapshot.build(state, growth_horizon=512)
    assert snapshot.reserve[6] == 96 and snapshot.usable_pages(6) == 4 and snapshot.free == {7}
    available = snapshot.usable_pages(6) + snapshot.usable_pages(7)
    assert [r.request_id for r in admit_fifo(snapshot, state.waiting, available, available, 100)] == ["w0"]
    loose = ClusterSnapshot.build(state, growth_horizon=0)
    available = loose.usable_pages(6) + loose.usable_pages(7)
    assert [r.request_id for r in admit_fifo(loose, state.waiting, available, available, 100)] == ["w0", "w1"]
    # The policy admits only w0 and keeps its KV off 6, whose free pages are reserved.
    plan = EspPolicy().schedule(state)
    assert {rid: segments for rid, (_, segments) in prefill_map(plan).items()} == {"w0": ((7, 800),)}


def test_decode_instances_are_not_lent_to_a_long_prompt_when_chats_would_wait():
    # Everything busy but instance 7, which decodes one chat request (40-token prompt). Delaying the chat by
    # a 50K-token prefill costs far more normalised latency than the long prompt gains.
    chat = decoding("chat", 100, {7: 40}, 7)
    plan = EspPolicy().schedule(view(instances([0] * 7 + [900], busy=range(7)), waiting(50_000), [chat]))
    assert not plan.prefills and [b.request_ids for b in plan.decodes] == [("chat",)]


def test_decode_instances_are_lent_when_the_queue_gains_more():
    # Instance 7 decodes one request with a 12K-token prompt (cheap to delay, normalised); ten 100-token
    # prompts would otherwise wait ~10 s for an instance.
    long_context = decoding("long", 100, {7: 12_000}, 7, max_new_tokens=4000)
    plan = EspPolicy().schedule(view(instances([0] * 7 + [200], busy=range(7)), waiting(*[100] * 10), [long_context]))
    assert [b.group for b in plan.prefills] == [(7,)] and plan.prefills[0].request_ids
    assert not plan.decodes  # its decode waits this step


def test_consolidation_frees_an_instance_by_migration():
    # Decode group {6,7}: "a" mostly on 6 with a tail on 7, "b" on 7. With lending switched off, moving 7's
    # shares to 6 frees 7 for the queue: both moves go 7 -> 6 and the group does not decode this step.
    decodes = [decoding("a", 100, {6: 8000, 7: 100}, 6, max_new_tokens=4000),
               decoding("b", 101, {7: 300}, 7, max_new_tokens=4000)]
    state = view(instances([0] * 6 + [400, 900], busy=range(6), busy_for=30), waiting(*[100] * 10), decodes)
    plan = EspPolicy(max_lent_groups=0).schedule(state)
    assert [(m.request_id, m.src_instance, m.dst_instance, m.n_tokens) for m in plan.migrations] == [
        ("a", 7, 6, 100), ("b", 7, 6, 300)]
    assert not plan.decodes and not plan.prefills
    # When the queue is empty there is nothing to gain: no migration.
    quiet = view(instances([0] * 6 + [400, 900], busy=range(6), busy_for=30), (), decodes)
    assert not EspPolicy(max_lent_groups=0).schedule(quiet).migrations


def test_scale_down_keeps_kv_on_as_few_instances_as_hold_it():
    # 1000 pages (16,000 slots) per instance: a 30K prompt prefills on all 8 but keeps KV on 2 of them.
    plan = EspPolicy().schedule(view(instances([1000] * 8), waiting(30_000)))
    (group, segments), = prefill_map(plan).values()
    assert group == tuple(range(8)) and len(segments) == 2 and sum(n for _, n in segments) == 30_000
    assert plan.prefills[0].leaving_instances == (2, 3, 4, 5, 6, 7)
    # A short prompt stays on one instance whatever its DoP.
    plan = EspPolicy().schedule(view(instances([1000] * 8), waiting(500)))
    assert [len(seg) for _, seg in prefill_map(plan).values()] == [1]


def test_scale_down_avoids_the_full_instance_and_keeps_growth_room():
    # Instance 2 has only 300 free pages: the keeping pair inside 0..3 is {0,1}; the master (last segment)
    # keeps room for the growth.
    plan = EspPolicy().schedule(view(instances([1000, 1000, 300, 1000]), waiting(30_000),
                                     cost=synthetic_cost(max_dop=4)))
    (group, segments), = prefill_map(plan).values()
    assert {i for i, _ in segments} == {0, 1}


def test_decode_scale_up_picks_a_new_master_with_free_pages():
    # "a" lives on 2, whose last page is full and which has no free page: its new master is 3 (most free
    # pages in the parent group {2,3}); the old KV stays, so the decode group becomes {2,3}.
    plan = EspPolicy().schedule(view(instances([5, 5, 0, 7, 5, 5, 5, 5]), (), [decoding("a", 1, {2: 64}, 2)]))
    assert [(b.group, b.masters) for b in plan.decodes] == [((2, 3), (3,))]
    # {2,3} both full: the search climbs to {0,1,2,3} and picks 1.
    plan = EspPolicy().schedule(view(instances([5, 9, 0, 0, 5, 5, 5, 5]), (), [decoding("a", 1, {2: 64, 3: 64}, 3)]))
    assert [(b.group, b.masters) for b in plan.decodes] == [((0, 1, 2, 3), (1,))]


def test_out_of_pages_preempts_the_newest_request():
    decodes = [decoding("old", 1, {0: 64}, 0), decoding("new", 2, {0: 32, 1: 32}, 1)]
    plan = EspPolicy().schedule(view(instances([0, 0]), (), decodes, cost=synthetic_cost(max_dop=2)))
    assert [p.request_id for p in plan.preemptions] == ["new"]
    assert [(b.request_ids, b.masters) for b in plan.decodes] == [(("old",), (0,))]


def test_request_that_can_never_fit_is_rejected():
    plan = EspPolicy().schedule(view(instances([10, 10], total=10), waiting(400, 10), cost=synthetic_cost(max_dop=2)))
    assert plan.rejections == ("w0",)


def test_ready_programs_steer_the_group_choice():
    # Only the prefill program of group 4..7 for this bucket is compiled; compiling costs 30 s.
    ready = frozenset({("prefill", (4, 5, 6, 7), power_of_two_bucket(60_000))})
    plan = EspPolicy().schedule(view(instances([4000] * 8, total=4000), waiting(60_000), ready_programs=ready))
    assert [b.group for b in plan.prefills] == [(4, 5, 6, 7)]
    eager = EspPolicy().schedule(view(instances([4000] * 8, total=4000), waiting(60_000), ready_programs=ready,
                                      compile_cost_s=0.01))
    assert [b.group for b in eager.prefills] == [tuple(range(8))]  # a 10 ms compile is worth DoP 8


def workload(seed, count, rate, longest, outputs):
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    for k in range(count):
        now += rng.expovariate(rate)
        arrivals.append((now, k, rng.choice([rng.randint(16, 200), rng.randint(200, longest)]), rng.randint(*outputs)))
    return arrivals


def run_esp(seed, policy):
    cost = synthetic_cost(pages_per_instance=64)
    state = EngineState(8, 64, 16)
    report = drive(state, policy, cost, workload(seed, 30, 40.0, 1500, (200, 1200)), check_every=7,
                   tell_max_tokens=False)
    state.allocator.assert_all_free()
    assert Counter(r.finish_reason for r in state.requests.values()) == {"finished": 30}
    for plan in report.plans[::50]:
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    return state, report


def test_scarce_memory_run_scales_down_up_and_preempts_and_frees_every_page():
    # Output lengths are hidden from the state, so decode growth outruns the reservation: scale-up, then
    # preemption. (Which moves a run needs depends on its whole trajectory; this seed needs all of them.)
    state, report = run_esp(0, EspPolicy())
    assert state.counters["scale_ups"] > 0 and state.counters["scale_downs"] > 0 and state.counters["preemptions"] > 0
    assert len({len(b.group) for p in report.plans for b in p.prefills}) >= 3  # several prefill degrees
    assert max(r.num_preemptions for r in state.requests.values()) >= 1


def test_consolidation_through_the_engine_state_frees_an_instance_for_the_queue():
    cost = synthetic_cost(pages_per_instance=1000)
    state = EngineState(8, 1000, 16)

    def prefill(request_id, length, group, segments, seconds=0.0, output=4000):
        state.add_request(request_id, length, max_new_tokens=output)
        batch = PrefillBatch(group, (request_id,), ((0, length),), (segments,), estimated_s=seconds)
        state.on_dispatched(Plan(prefills=(batch,)), now=0.0)
        return batch

    for name, length, group, segments in [("a", 8100, (6, 7), ((6, 8000), (7, 100))), ("b", 300, (7,), ((7, 300),))]:
        state.apply(UnitResult(prefill(name, length, group, segments), {name: 1}, frozenset(), 0.0))
    for k in range(6):  # long prefills keep 0..5 busy for 30 s
        prefill(f"x{k}", 1000, (k,), ((k, 1000),), seconds=30.0)
    for k in range(10):
        state.add_request(f"w{k}", 100, max_new_tokens=64, arrival=0.5)
    policy = EspPolicy(max_lent_groups=0)
    plan = policy.schedule(state.view(cost, now=1.0))
    assert [(m.request_id, m.src_instance, m.dst_instance) for m in plan.migrations] == [("a", 7, 6), ("b", 7, 6)]
    (unit,) = state.on_dispatched(plan, now=1.0)
    assert state.requests["b"].master == 6 and state.allocator.pages_free(7) < 1000  # source held while moving
    state.apply(UnitResult(unit, {}, frozenset(), 1.01))
    state.check_invariants()
    assert state.allocator.pages_free(7) == 1000 and state.requests["a"].kv == {6: 8100}
    plan = policy.schedule(state.view(cost, now=1.01))
    assert {b.group for b in plan.prefills} == {(7,)}  # the freed instance prefills the queue
    assert [(b.group, set(b.request_ids)) for b in plan.decodes] == [((6,), {"a", "b"})]
