"""Prefix cache on the host: block hashes, the allocator's cached pages (hits, LRU eviction, clear), and the
engine state with real policies (hits planned, checked and attached; pages inserted when prefills end),
including a hypothesis-driven workload of random shared prefixes, aborts and evictions with no page leaks."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loong_jax.engine.kv_allocator import KVAllocator
from loong_jax.engine.prefix_cache import PrefixCacheOptions, chain_hashes, document_hashes
from loong_jax.engine.state import EngineState, PlanError
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.cost.estimates import unit_seconds
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, Preemption, PrefillBatch
from loong_jax.scheduler.policy import build_policy
from loong_jax.scheduler.view import FINISHED, WAITING
from tests.scheduler.helpers import synthetic_cost

PAGE = 4


def test_chain_hashes_name_equal_prefixes_equally():
    a = chain_hashes(list(range(10)), PAGE)
    b = chain_hashes(list(range(8)) + [99, 98, 97], PAGE)
    assert len(a) == 2 and len(b) == 2  # full pages only
    assert a[0] == b[0] and a[1] == b[1]
    c = chain_hashes([5] + list(range(1, 10)), PAGE)
    assert c[0] != a[0] and c[1] != a[1]  # the chain carries every earlier token
    assert chain_hashes(list(range(10)), PAGE, "other model")[0] != a[0]
    assert document_hashes("doc", 9, PAGE) == document_hashes("doc", 12, PAGE)[:2]


def _filled(allocator: KVAllocator, request, instance, tokens, hashes):
    allocator.allocate(request, instance, tokens, start_position=0)
    return allocator.cache_prompt_pages(request, hashes)


def test_allocator_keeps_cached_pages_idle_and_evicts_the_tail_first():
    allocator = KVAllocator(6, PAGE, 2)
    hashes = document_hashes("doc", 16, PAGE)
    assert _filled(allocator, "a", 0, 14, hashes) == 3  # the 4th page is partly filled: not cached
    allocator.free_request("a")
    allocator.check_invariants()
    assert allocator.pages_free(0) == 6 and allocator.pages_cached(0) == 3
    hit = allocator.prefix_cache.lookup(hashes, 3)
    assert [i for i, _ in hit] == [0, 0, 0]
    allocator.attach_prefix("b", hit[:2])
    assert allocator.kv_layout("b") == {0: 8} and allocator.pages_free(0) == 4  # block 2 idle, 3 free
    allocator.allocate("b", 0, 5, start_position=8)  # 2 pages: the 3 free ones first ...
    allocator.allocate("c", 0, 2 * PAGE)  # ... then 2 pages: the last free one, then the idle cached block 2
    assert allocator.prefix_cache.lookup(hashes, 3) == hit[:2]  # the deepest block went first
    assert allocator.prefix_cache.stats.evictions == 1
    allocator.check_invariants()
    for request in ("b", "c"):
        allocator.free_request(request)
    allocator.assert_all_free()  # free or held by the cache only
    assert allocator.pages_cached(0) == 2 and allocator.clear_prefix_cache() == 2
    allocator.assert_all_free()
    assert allocator.pages_cached(0) == 0 and allocator.prefix_cache.lookup(hashes, 3) == ()


def test_cache_capacity_and_disabled_cache():
    allocator = KVAllocator(8, PAGE, 1, PrefixCacheOptions(max_fraction=0.25))
    hashes = document_hashes("doc", 32, PAGE)
    assert _filled(allocator, "a", 0, 16, hashes) == 2  # capacity: 2 of 8 pages
    allocator.free_request("a")
    assert _filled(allocator, "b", 0, 16, document_hashes("other", 32, PAGE)) == 2  # evicts a's idle pages
    assert allocator.prefix_cache.lookup(hashes, 4) == ()
    disabled = KVAllocator(8, PAGE, 1, PrefixCacheOptions(enabled=False))
    assert _filled(disabled, "a", 0, 16, hashes) == 0
    with pytest.raises(ValueError, match="max_fraction"):
        PrefixCacheOptions(max_fraction=1.5)


def _state(num_instances=4, pages=40, **options):
    return EngineState(num_instances, pages, PAGE, PrefixCacheOptions(**options))


def _finish_prefill(state, unit, now=1.0):
    return state.apply(UnitResult(unit, {r: 7 for r in unit.request_ids}, frozenset(), now))


def test_a_hit_starts_at_the_cached_length_on_the_instance_holding_the_prefix():
    state, cost = _state(), synthetic_cost(PAGE, 40, 4)
    policy = build_policy("fixed", 4, 1, 1)
    document = list(range(10, 30))  # 5 pages
    state.add_request("filler", 140, 4, prompt_token_ids=[3] * 140)  # fills instance 0: the doc goes elsewhere
    state.add_request("doc", 22, 4, prompt_token_ids=document + [1, 2])
    plan = policy.schedule(state.view(cost))
    units = {unit.request_ids[0]: unit for unit in state.on_dispatched(plan)}
    assert units["filler"].group == (0,) and units["doc"].group != (0,)
    doc_instance = units["doc"].group
    for unit in units.values():
        _finish_prefill(state, unit)
    state.abort("filler")  # instance 0 is idle and empty again
    assert state.allocator.pages_cached(doc_instance[0]) == 5
    state.add_request("question", 23, 4, prompt_token_ids=document + [5, 6, 7])
    view = state.view(cost)
    (question,) = view.waiting
    assert question.cached_tokens == 20 and question.cached_kv == {doc_instance[0]: 20}
    assert question.cached_pins == {}  # "doc" still holds the pages: nothing leaves the free pool
    plan = policy.schedule(view)
    (batch,) = plan.prefills
    # Instance 0 is idle and first in line, but the prefix lives on the doc's instance: it goes there.
    assert batch.group == doc_instance and batch.chunks == ((20, 3),)
    state.on_dispatched(plan)
    assert state.requests["question"].kv == {doc_instance[0]: 23}
    state.check_invariants()
    assert state.prefix_cache.stats.hits == 1 and state.prefix_cache.stats.hit_tokens == 20


def test_a_plan_misusing_the_cache_is_refused_and_changes_nothing():
    state, cost = _state(), synthetic_cost(PAGE, 40, 4)
    tokens = list(range(10, 30))
    state.add_request("doc", 20, 2, prompt_token_ids=tokens)
    plan = build_policy("fixed", 4, 1, 1).schedule(state.view(cost))
    (unit,) = state.on_dispatched(plan)
    _finish_prefill(state, unit)
    state.add_request("q", 29, 2, prompt_token_ids=tokens + [3] * 9)
    other = (unit.group[0] + 1) % 4
    for group, chunk in (((other,), (20, 9)), (unit.group, (24, 5)), (unit.group, (3, 26))):
        bad = Plan(prefills=(PrefillBatch(group, ("q",), (chunk,), (((group[0], chunk[1]),),)),))
        with pytest.raises(PlanError, match="cached|outside|computed"):
            state.on_dispatched(bad)
        assert state.requests["q"].status == WAITING and not state.requests["q"].kv
        state.check_invariants()
    # A hit may use fewer cached pages than there are (here 2 of 5).
    state.on_dispatched(Plan(prefills=(PrefillBatch(unit.group, ("q",), ((8, 21),), (((unit.group[0], 21),),)),)))
    assert state.requests["q"].kv == {unit.group[0]: 29}
    state.check_invariants()
    # The last prompt token is never reused, even when the whole prompt is cached.
    state.add_request("same", 20, 2, prompt_token_ids=tokens)
    assert {r.request_id: r.cached_tokens for r in state.view(cost).waiting} == {"same": 16}


class _Workload:
    """An event-driven run of one policy over EngineState (fixed output lengths, cost model clock), with
    aborts at chosen steps."""

    def __init__(self, state, policy, cost):
        self.state, self.policy, self.cost = state, policy, cost
        self.events, self.counter, self.now = [], itertools.count(), 0.0

    def run(self, requests, aborts, arrivals=None, tell_outputs=None, max_steps=5000):
        """requests: (id, prompt token ids, output length); `arrivals[id]`: the step it arrives at (0);
        `tell_outputs[id]` False: the state does not learn the output length (growth guessed: preemptions)."""
        output_len = {request_id: outputs for request_id, _, outputs in requests}
        arriving = sorted(requests, key=lambda r: (arrivals or {}).get(r[0], 0))
        for step in range(max_steps):
            while arriving and (arrivals or {}).get(arriving[0][0], 0) <= step:
                request_id, tokens, outputs = arriving.pop(0)
                told = outputs if (tell_outputs or {}).get(request_id, True) else None
                self.state.add_request(request_id, len(tokens), told, arrival=self.now, prompt_token_ids=tokens)
            for request_id in aborts.get(step, ()):
                self.state.abort(request_id, self.now)
            # Unknown output lengths are guessed short: requests outgrow their room (scale-up, preemption).
            plan = self.policy.schedule(self.state.view(self.cost, now=self.now, default_output_tokens=4))
            for unit in self.state.on_dispatched(plan, self.now):
                seconds = unit_seconds(self.cost, unit, lambda r: self.state.requests[r].context_len)
                heapq.heappush(self.events, (self.now + max(seconds, 1e-9), next(self.counter), unit))
            self.state.check_invariants()
            if not self.events:
                if arriving:
                    continue
                assert not self.state.has_unfinished(), "deadlock"
                return
            self.now, _, unit = heapq.heappop(self.events)
            self.state.apply(self._result(unit, output_len))
        raise AssertionError("no end")

    def _result(self, unit, output_len):
        if isinstance(unit, MigrationBatch):
            return UnitResult(unit, {}, frozenset(), self.now)
        producing = []
        prefill = unit if isinstance(unit, PrefillBatch) else unit.fused_prefill
        if prefill is not None:
            producing += [r for r, (s, n) in zip(prefill.request_ids, prefill.chunks)
                          if s + n == self.state.requests[r].prefill_target]
        if isinstance(unit, DecodeBatch):
            producing += list(unit.request_ids)
        finished = {r for r in producing if self.state.requests[r].num_generated + 1 >= output_len[r]}
        return UnitResult(unit, dict.fromkeys(producing, 7), frozenset(finished), self.now)


POLICIES = [("fixed", 1, 1), ("fixed", 2, 2), ("fixed", 4, 1), ("fixed", 1, 4), ("esp", None, None),
            ("chunked-prefill", 2, None), ("static-sp", 2, None), ("replicas", None, None), ("pd-disagg", None, None)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_index=st.integers(0, len(POLICIES) - 1), seed=st.integers(0, 2 ** 16),
       pages=st.sampled_from([24, 40, 80]), fraction=st.sampled_from([0.3, 1.0]))
def test_random_shared_prefixes_aborts_and_evictions_leak_no_page(policy_index, seed, pages, fraction):
    name, prefill_degree, decode_degree = POLICIES[policy_index]
    rng = np.random.default_rng(seed)
    state = _state(4, pages, max_fraction=fraction)
    policy = build_policy(name, 4, prefill_degree, decode_degree)
    documents = [rng.integers(4, 300, size=int(rng.integers(4, 3 * pages))).tolist() for _ in range(3)]
    requests = []
    for k in range(int(rng.integers(4, 14))):
        document = documents[int(rng.integers(0, len(documents)))]
        cut = int(rng.integers(1, len(document) + 1))
        question = rng.integers(4, 300, size=int(rng.integers(1, 9))).tolist()
        prompt = document[:cut] + question
        room = pages * PAGE - len(prompt) - PAGE  # the whole context fits one instance
        requests.append((f"r{k}", prompt, int(rng.integers(1, max(2, min(40, room))))))
    aborts, arrivals, told = {}, {}, {}
    for request_id, _, _ in requests:
        if rng.random() < 0.2:
            aborts.setdefault(int(rng.integers(0, 60)), []).append(request_id)
        arrivals[request_id] = int(rng.integers(0, 40))
        told[request_id] = rng.random() < 0.7
    _Workload(state, policy, synthetic_cost(PAGE, pages, 4)).run(requests, aborts, arrivals, told)
    assert all(r.status == FINISHED for r in state.requests.values())
    state.allocator.assert_all_free()
    state.allocator.clear_prefix_cache()
    state.allocator.assert_all_free()
    assert all(state.allocator.pages_cached(i) == 0 for i in range(4))
    assert all(len(state.allocator._free[i]) == pages for i in range(4))


def test_shared_document_workload_hits_and_prices_less():
    """Questions on one document: with the cache every policy prefills only their suffix."""
    document = list(range(4, 4 + 120))
    requests = [(f"q{k}", document + [300 + k, 301 + k], 3) for k in range(6)]
    for name, prefill_degree, decode_degree in POLICIES:
        seconds = {}
        for enabled in (True, False):
            state = _state(4, 200, enabled=enabled)
            policy = build_policy(name, 4, prefill_degree, decode_degree)
            run = _Workload(state, policy, synthetic_cost(PAGE, 200, 4))
            first, rest = requests[:1], requests[1:]
            run.run(first, {})
            run.run(rest, {})
            state.allocator.assert_all_free()
            seconds[enabled] = run.now
            stats = state.prefix_cache.stats
            assert stats.hits == (len(rest) if enabled else 0), name
        assert seconds[True] < seconds[False], name


def test_preempting_a_request_on_cached_pages_keeps_counts_exact_and_it_hits_again():
    state, cost = _state(), synthetic_cost(PAGE, 40, 4)
    policy = build_policy("fixed", 4, 1, 1)
    document = list(range(10, 30))
    state.add_request("doc", 21, 2, prompt_token_ids=document + [1])
    (unit,) = state.on_dispatched(policy.schedule(state.view(cost)))
    _finish_prefill(state, unit)
    state.add_request("q", 22, 8, prompt_token_ids=document + [2, 3])
    (unit,) = state.on_dispatched(policy.schedule(state.view(cost)))
    assert unit.chunks == ((20, 2),)
    _finish_prefill(state, unit)
    instance = unit.group[0]
    cached = state.allocator.pages_cached(instance)
    used = state.allocator.pages_used(instance)
    state.on_dispatched(Plan(preemptions=(Preemption("q"),)))
    state.check_invariants()
    assert state.requests["q"].status == WAITING and state.allocator.pages_cached(instance) == cached
    assert state.allocator.pages_used(instance) == used - 1  # only q's own suffix page came free
    state.abort("doc")  # the document's pages are now held by the cache alone (idle)
    (waiting,) = state.view(cost).waiting
    assert waiting.cached_tokens == 20 and waiting.cached_pins == {instance: 5}
    (unit,) = state.on_dispatched(policy.schedule(state.view(cost)))
    assert unit.chunks == ((20, 3),)  # prompt + the token generated before the preemption
    state.check_invariants()
    state.abort("q")
    state.apply(UnitResult(unit, {}, frozenset(), 2.0))
    state.allocator.assert_all_free()
    assert state.allocator.clear_prefix_cache() == cached and state.allocator.pages_free(instance) == 40


def test_the_snapshot_reports_cached_pages_hits_and_hit_rate():
    from loong_jax.engine.snapshot import capture

    document = list(range(4, 4 + 40))
    state = _state(4, 100)
    run = _Workload(state, build_policy("fixed", 4, 1, 1), synthetic_cost(PAGE, 100, 4))
    run.run([("doc", document + [1], 2)], {})
    run.run([("q", document + [2, 3], 2)], {})

    class Policy:
        name, late_requests = "fixed", 0

    snapshot = capture(state, lambda: 0.0, policy=Policy(), prefill_dops={}, decode_dops={}, executor_stats={},
                       token_limits=(1, 1))
    assert snapshot.prefix_cache_queries == 2 and snapshot.prefix_cache_hits == 1
    assert snapshot.prefix_cache_hit_tokens == 40 and snapshot.prefix_cache_query_tokens == 41 + 42
    assert sum(snapshot.kv_pages_cached) == 10 and snapshot.kv_pages_used == (0,) * 4
    assert abs(snapshot.prefix_cache_hit_rate - 40 / 83) < 1e-12


def test_questions_arriving_together_wait_for_the_first_to_compute_their_document():
    state, cost = _state(), synthetic_cost(PAGE, 40, 4)
    document = list(range(10, 50))  # 10 pages
    state.add_request("q0", 42, 2, prompt_token_ids=document + [1, 2])
    state.add_request("q1", 43, 2, prompt_token_ids=document + [3, 4, 5])
    state.add_request("short", 12, 2, prompt_token_ids=document[:4] + [6] * 8)  # shares 4 of 12 tokens
    assert [r.request_id for r in state.view(cost).waiting] == ["q0", "short"]  # q1 waits for q0's pages
    plan = build_policy("fixed", 4, 1, 1).schedule(state.view(cost))
    units = state.on_dispatched(plan)
    assert [r.request_id for r in state.view(cost).waiting] == []  # q0 is computing the document
    for unit in units:
        _finish_prefill(state, unit)
    (waiting,) = state.view(cost).waiting
    assert waiting.request_id == "q1" and waiting.cached_tokens == 40
    state.check_invariants()


def test_arrivals_are_walked_alone_and_the_view_equals_a_fresh_walk(monkeypatch):
    state, cost = _state(), synthetic_cost(PAGE, 40, 4)
    document = list(range(10, 50))
    refreshed = []
    refresh = state.prefix_hits.refresh
    monkeypatch.setattr(state.prefix_hits, "refresh", lambda request: refreshed.append(request.request_id)
                        or refresh(request))

    def arrive(name, tail):
        state.add_request(name, len(document) + len(tail), 2, prompt_token_ids=document + tail)

    def shown():
        return [r.request_id for r in state.view(cost).waiting]

    arrive("q0", [1, 2])
    arrive("q1", [3, 4])
    assert shown() == ["q0"] and refreshed == ["q0", "q1"]  # q1 waits for q0's document
    refreshed.clear()
    state.add_request("short", 12, 2, prompt_token_ids=[7] * 12)
    arrive("q2", [5, 6])
    assert shown() == ["q0", "short"] and refreshed == ["short", "q2"]  # only the arrivals are walked
    assert shown() == ["q0", "short"] and refreshed == ["short", "q2"]  # nothing changed: nothing walked
    assert tuple(state.view(cost).waiting) == state.prefix_hits.schedulable(list(state.waiting))
    state.check_invariants()  # (compares the kept walk with a fresh one)
    refreshed.clear()
    state.abort("q0")  # an edit of the queue: the next view walks it whole
    assert shown() == ["q1", "short"] and refreshed == ["q1", "short", "q2"]


def test_a_request_waits_for_its_prefix_only_while_that_is_cheaper_than_recomputing():
    from loong_jax.scheduler.prefix import waits_for_prefix
    from loong_jax.scheduler.view import InstanceView, RequestView, SchedulerView

    cost = synthetic_cost(PAGE, 40, 4)
    request = RequestView("q", 0, 0.0, 1000, cached_tokens=960, cached_kv={1: 960})
    recompute = cost.prefill_time_from_sums(1, 960, 960 * 960)

    def view(busy_for):
        instances = tuple(InstanceView(i, 40, 40, busy=i == 1, busy_until=busy_for if i == 1 else 0.0)
                          for i in range(4))
        return SchedulerView(instances, (request,), (), PAGE, cost)

    assert waits_for_prefix(request, view(0.5 * recompute))
    assert not waits_for_prefix(request, view(2 * recompute))
    request.cached_kv = {2: 960}  # an idle instance: nothing to wait for
    assert not waits_for_prefix(request, view(0.5 * recompute))
