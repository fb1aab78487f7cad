"""ESP's queue discipline and the moves that keep it moving, on hand-made cluster states: deadline order,
overload triage (the largest requests go late, none starves), rejection of never-fitting requests, the
head's reservation with backfill, evacuation of the reserved group's decodes, compact placement
(scale-down) and consolidation across one-instance decode groups."""

import math

from loong_jax.scheduler.esp.policy import EspPolicy
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.esp.queue import OfferedLoad, deadline_order, reserve_for_head
from loong_jax.scheduler.esp.scaling import place_request
from loong_jax.scheduler.view import InstanceView, RequestView

from tests.scheduler.helpers import decoding, view

NOW = 100.0


def cluster(free_pages, busy_until=None, total: int = 1000):
    """Instances with these free pages; `busy_until[i]` (absolute) marks instance i busy."""
    busy_until = busy_until or {}
    return tuple(InstanceView(i, total, free, i in busy_until, busy_until.get(i, 0.0))
                 for i, free in enumerate(free_pages))


def request(request_id, prompt_len, arrival, seq, max_new_tokens=64):
    return RequestView(request_id, seq, arrival, prompt_len, max_new_tokens=max_new_tokens)


def prefilled(plan):
    return {rid: batch.group for batch in plan.prefills for rid in batch.request_ids}


def test_deadline_order_puts_short_requests_first_and_hopeless_ones_last():
    old_long = request("long", 60_000, NOW - 1.0, 0)
    new_chat = request("chat", 50, NOW - 0.5, 1)
    hopeless = request("late", 2_000, NOW - 500.0, 2)  # waited far past 25x its isolated latency
    snapshot = ClusterSnapshot.build(view(cluster([1000] * 8), [old_long, new_chat, hopeless]), 512)
    timely, late = deadline_order(snapshot, [old_long, new_chat, hopeless])
    assert [r.request_id for r in timely] == ["chat", "long"] and [r.request_id for r in late] == ["late"]
    fifo = EspPolicy(queue="fifo").schedule(view(cluster([1000] * 8), [old_long, new_chat, hopeless], now=NOW))
    assert set(prefilled(fifo)) == {"long", "chat", "late"}  # FIFO order still serves everyone that fits


def test_over_the_work_limit_a_request_is_late_unless_it_has_waited_too_long():
    chat, doc = request("chat", 50, NOW - 0.5, 0), request("doc", 60_000, NOW - 1.0, 1)
    snapshot = ClusterSnapshot.build(view(cluster([1000] * 8), [chat, doc], now=NOW), 512)
    limit = (snapshot.work(chat) + snapshot.work(doc)) / 2
    timely, late = deadline_order(snapshot, [doc, chat], limit)
    assert [r.request_id for r in timely] == ["chat"] and [r.request_id for r in late] == ["doc"]
    # Waiting 4x its latency budget puts it first, over the limit or not: no request waits forever.
    starving = request("doc", 60_000, NOW - 4.01 * 25 * snapshot.isolated(doc), 1)
    timely, late = deadline_order(snapshot, [chat, starving], limit, starvation_limit=4.0)
    assert [r.request_id for r in timely] == ["doc", "chat"] and not late


def _arrivals(load: OfferedLoad, works_and_times):
    """Feed arrivals (work instance-seconds, arrival s) through a stub snapshot that knows each work."""
    requests = [request(f"r{k}", 10, arrival, k) for k, (_, arrival) in enumerate(works_and_times)]
    work = {r.request_id: w for r, (w, _) in zip(requests, works_and_times)}

    class Snapshot:
        def work(self, r):
            return work[r.request_id]

        def isolated(self, r):
            return work[r.request_id] / 2

    load.observe(Snapshot(), requests)


def test_offered_load_names_no_limit_within_capacity_and_sheds_the_largest_beyond():
    # 2 instances at utilization 1 take 2 instance-seconds per second.
    def load(arrivals):
        offered = OfferedLoad(utilization=1.0, min_arrivals=8)
        _arrivals(offered, arrivals)
        return offered.work_limit(2)

    assert load([(1.0, t) for t in range(11)]) == math.inf  # 11 s of work over 10 s
    assert 1.0 <= load([(1.0, t) for t in range(10)] + [(30.0, 10.0)]) < 30.0  # + one 30 s request: it is late
    assert load([(1.0, t) for t in range(7)]) == math.inf  # fewer arrivals than min_arrivals: no judgement
    assert load([(50.0, 3.0)] * 9) == math.inf  # all at once: no rate to judge by
    # Equal requests arriving 3x faster than served: none is larger than the others, none is late.
    assert load([(3.0, t / 2) for t in range(20)]) >= 3.0
    typical = OfferedLoad()
    _arrivals(typical, [(1.0, 0.0), (2.0, 1.0), (30.0, 2.0)])
    assert typical.typical_latency() == 1.0  # the median isolated latency


def test_offered_load_counts_each_arrival_once():
    # A request seen again (still waiting, or back after a recompute preemption: it keeps its seq) is not
    # a new arrival; only higher sequence numbers are.
    load = OfferedLoad(utilization=1.0, min_arrivals=2)
    _arrivals(load, [(1.0, 0.0), (1.0, 1.0)])
    _arrivals(load, [(1.0, 0.0), (1.0, 1.0), (1.0, 2.0)])  # r0, r1 again and r2 new
    assert len(load._arrivals) == 3


def test_under_overload_a_late_giant_waits_for_an_idle_cluster_while_a_late_essay_may_start():
    # The policy saw chats and essays (short prompts, 30K-token answers) arrive faster than 8 instances
    # serve them: the essays are over the work limit. A late giant does not start while a chat decodes (its
    # prefill would hold every instance for seconds); a late essay does (its prefill takes milliseconds).
    # On an idle cluster the giant starts.
    policy = EspPolicy()
    history = [request(f"h{k}", 500, NOW - 40 + k, k, max_new_tokens=30_000 if k % 3 == 0 else 64)
               for k in range(40)]
    policy.schedule(view(cluster([20_000] * 8, total=20_000), history, now=NOW - 1))
    giant, essay = request("giant", 400_000, NOW - 0.5, 100), request("essay", 500, NOW - 0.5, 101, 30_000)
    snapshot = ClusterSnapshot.build(view(cluster([20_000] * 8, total=20_000), [giant, essay], now=NOW), 512)
    assert snapshot.work(essay) > policy.queue.load.work_limit(8) and snapshot.work(giant) > policy.queue.load.work_limit(8)
    chat = decoding("chat", 99, {0: 40}, 0)
    busy_plan = policy.schedule(view(cluster([20_000] * 8, total=20_000), [giant, essay], [chat], now=NOW))
    assert set(prefilled(busy_plan)) == {"essay"} and busy_plan.decodes
    assert policy.late_requests == 2  # what the server's loong_jax_requests_late gauge shows
    idle_plan = policy.schedule(view(cluster([20_000] * 8, total=20_000), [giant], now=NOW))
    assert "giant" in prefilled(idle_plan)


def test_requests_that_can_never_fit_the_configured_limits_are_rejected():
    # 8 instances x 1,000 tokens per instance: a 9,000-token prompt can never be prefilled, 7,000 can.
    waiting = [request("big", 9_000, NOW - 1, 0), request("ok", 7_000, NOW - 1, 1)]
    plan = EspPolicy(max_tokens_per_instance=1_000).schedule(view(cluster([1000] * 8), waiting, now=NOW))
    assert plan.rejections == ("big",)
    assert "ok" in prefilled(plan)
    # Without the limit both fit (16,000 tokens per instance).
    assert EspPolicy().schedule(view(cluster([1000] * 8), waiting, now=NOW)).rejections == ()


def test_reservation_holds_the_pair_the_head_needs_and_shorter_requests_backfill_elsewhere():
    # The head (20K tokens) needs two instances (16K tokens each). Instances 5 and 6 are idle and empty, 7
    # frees in 50 ms, the rest in 30 s. No aligned free pair exists, so (6, 7) is reserved for the head:
    # 6 starts nothing, and the chat behind the head backfills onto 5.
    head = request("head", 20_000, NOW - 10.0, 0)
    chat = request("chat", 100, NOW - 0.1, 1)
    busy = {i: NOW + 30.0 for i in range(5)} | {7: NOW + 0.05}
    state = view(cluster([1000] * 8, busy), [head, chat], now=NOW)
    snapshot = ClusterSnapshot.build(state, 512)
    reservation = reserve_for_head(snapshot, head)
    assert reservation.group == (6, 7) and reservation.fits and not reservation.ready
    plan = EspPolicy().schedule(state)
    assert prefilled(plan) == {"chat": (5,)}
    # Once 7 is idle the head prefills on the pair, its KV kept on both (it needs them).
    ready = view(cluster([1000] * 8, {i: NOW + 30.0 for i in range(5)}), [head, chat], now=NOW)
    plan = EspPolicy().schedule(ready)
    assert prefilled(plan)["head"] == (6, 7)
    batch = next(b for b in plan.prefills if "head" in b.request_ids)
    assert {i for i, _ in batch.placement[batch.request_ids.index("head")]} == {6, 7}


def test_a_long_head_reserves_a_group_wide_enough_to_prefill_it_within_the_typical_latency():
    # 20K tokens need a pair (16K per instance). Alone on it the prefill takes longer than a typical request
    # would wait; on four instances it does not: the reservation takes four rather than stall a pair long.
    head = request("head", 20_000, NOW - 10.0, 0)
    snapshot = ClusterSnapshot.build(view(cluster([1000] * 8), [head], now=NOW), 512)
    pair, quad = snapshot.prefill_seconds(head, 2), snapshot.prefill_seconds(head, 4)
    assert len(reserve_for_head(snapshot, head).group) == 2
    assert len(reserve_for_head(snapshot, head, max_prefill_seconds=(pair + quad) / 2).group) == 4
    assert len(reserve_for_head(snapshot, head, max_prefill_seconds=0.0).group) == 8  # none is fast enough


def test_a_held_member_runs_only_a_decode_step_that_ends_before_the_group_is_ready():
    head = request("head", 20_000, NOW - 10.0, 0)
    chat_on_6 = decoding("d6", 1, {6: 40}, 6)
    for frees_in, decodes in ((5.0, True), (0.001, False)):
        busy = {i: NOW + 30.0 for i in range(6)} | {7: NOW + frees_in}
        plan = EspPolicy().schedule(view(cluster([1000] * 8, busy), [head], [chat_on_6], now=NOW))
        assert bool(plan.decodes) == decodes, frees_in


def test_decodes_on_the_reserved_instance_are_evacuated_before_its_prefill():
    # Every instance busy but 6 and 7, each decoding chats; the head (a 5K prompt, 0.1 s of prefill) gets one
    # of them. Instead of stalling the chats there for the prefill, their KV moves (ms) to the other.
    head = request("head", 5_000, NOW - 10.0, 0)
    chats = [decoding("c6a", 1, {6: 40}, 6), decoding("c6b", 2, {6: 30}, 6), decoding("c7", 3, {7: 50}, 7),
             decoding("c7b", 4, {7: 20}, 7)]
    busy = {i: NOW + 30.0 for i in range(6)}
    state = view(cluster([1000] * 8, busy), [head], chats, now=NOW)
    reserved = reserve_for_head(ClusterSnapshot.build(state, 512), head).group
    other = 13 - reserved[0]
    plan = EspPolicy().schedule(state)
    assert not plan.prefills and not plan.decodes
    assert sorted((m.src_instance, m.dst_instance) for m in plan.migrations) == [(reserved[0], other)] * 2
    moved = {m.request_id for m in plan.migrations}
    assert moved == {c.request_id for c in chats if reserved[0] in c.kv}


def test_compact_placement_never_spreads_a_short_prompt_wide():
    # Every instance has 2 usable pages (32 tokens) but instance 3, which has 20: a 100-token prompt in a
    # batch on all 8 instances keeps its KV on 3 alone, never in shares over 7 instances.
    state = view(cluster([2, 2, 2, 20, 2, 2, 2, 2]), [request("r", 100, NOW, 0, max_new_tokens=1)], now=NOW)
    snapshot = ClusterSnapshot.build(state, 0)
    assert place_request(snapshot, tuple(range(8)), state.waiting[0]) == ((3, 100),)
    # With no instance able to hold it alone the prompt stays waiting rather than spreading.
    tight = view(cluster([2] * 8), [request("r", 100, NOW, 0, max_new_tokens=1)], now=NOW)
    assert place_request(ClusterSnapshot.build(tight, 0), tuple(range(8)), tight.waiting[0]) is None


def test_placement_prefers_an_instance_already_decoding_so_free_ones_stay_free():
    chat = decoding("chat", 0, {2: 40}, 2)
    state = view(cluster([1000, 1000, 990, 1000]), [request("r", 3_000, NOW, 1)], [chat], now=NOW)
    snapshot = ClusterSnapshot.build(state, 512)
    assert place_request(snapshot, (0, 1, 2, 3), state.waiting[0]) == ((2, 3_000),)


def test_consolidation_across_one_instance_decode_groups_frees_an_instance():
    # 6 and 7 each decode one small request; everything else is busy for 30 s and lending is off. Moving
    # one instance's request to the other frees an instance for the ten waiting prompts.
    decodes = [decoding("a", 1, {6: 200}, 6, max_new_tokens=4000), decoding("b", 2, {7: 300}, 7, max_new_tokens=4000)]
    waiting = [request(f"w{k}", 100, NOW - 1.0, 10 + k) for k in range(10)]
    state = view(cluster([1000] * 8, {i: NOW + 30.0 for i in range(6)}), waiting, decodes, now=NOW)
    plan = EspPolicy(max_lent_groups=0).schedule(state)
    assert len(plan.migrations) == 1
    move = plan.migrations[0]
    assert {move.src_instance, move.dst_instance} == {6, 7}
    assert not plan.prefills and not plan.decodes  # both ends are busy with the move this step
