"""Prefix caching end to end on 8 simulated devices: questions on one document reuse its cached KV pages
(a suffix prefill attending to the cached prefix in the pools), and the greedy tokens are exactly the
single-device reference's (which recomputes every prompt) at prefill degrees 1, 2 and 4 and under ESP;
also when the prefix lives on another instance than the suffix would otherwise go to, when the prefix is
partly evicted, and when a request holding cached pages is preempted. Every page is free or cached at the
end, and clearing the cache frees them all."""

from __future__ import annotations

import numpy as np
import pytest

from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import Plan, PrefillBatch, Preemption
from tests.engine_fixtures import PAGE_SIZE, record_plans

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _document(vocab_size: int, seed: int, length: int = 60) -> list[int]:
    return np.random.default_rng(seed).integers(4, vocab_size, size=length).tolist()


def _questions(vocab_size: int, document: list[int], count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [document + rng.integers(4, vocab_size, size=int(rng.integers(1, 9))).tolist() for _ in range(count)]


def _generate_and_check(llm, reference, prompts):
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        tokens, _ = reference(prompt, MAX_TOKENS, eos_token_ids=())
        assert output.outputs[0].token_ids == tokens, f"prompt of {len(prompt)} tokens"
    return outputs


def _hits(plans) -> list[tuple]:
    """(group, start) of every prefill chunk that started on cached pages."""
    return [(batch.group, start) for plan in plans for batch in plan.prefills for start, _ in batch.chunks if start]


def _cache_a_document(llm, reference, seed: int, *policy) -> tuple[list[int], list[int]]:
    """On a fresh engine with `policy`, a document's first question runs (its pages are cached); returns the
    document and a second question on it."""
    llm.set_policy(*policy, warmup=False)
    vocab = llm.config.vocab_size
    document = _document(vocab, seed=seed)
    first, second = _questions(vocab, document, 2, seed=seed + 1)
    _generate_and_check(llm, reference, [first])
    return document, second


def _override_policy(llm, override) -> None:
    """The engine's policy, except that `override(view)` plans first when it returns a Plan (not None)."""
    policy = llm.engine.policy

    class Overridden:
        name = policy.name

        def schedule(self, view):
            plan = override(view)
            return policy.schedule(view) if plan is None else plan

        def __getattr__(self, attribute):
            return getattr(policy, attribute)

    llm.engine.core.policy = Overridden()


def _check_pages(llm):
    llm.engine.check_all_free()  # free, or held by the cache alone
    allocator = llm.engine.state.allocator
    assert sum(allocator.pages_cached(i) for i in range(allocator.num_instances)) > 0
    allocator.clear_prefix_cache()
    llm.engine.check_all_free()
    assert all(allocator.pages_cached(i) == 0 for i in range(allocator.num_instances))


@pytest.mark.parametrize("policy,degree", [("fixed", 1), ("fixed", 4), ("esp", None)])
def test_questions_on_a_cached_document_match_the_reference(shared_llm, reference, policy, degree):
    shared_llm.set_policy(policy, degree, degree, warmup=False)  # a fresh engine: an empty cache
    vocab = shared_llm.config.vocab_size
    document = _document(vocab, seed=degree or 8)
    first, *rest = _questions(vocab, document, 4, seed=1)
    _generate_and_check(shared_llm, reference, [first])
    plans = record_plans(shared_llm)
    _generate_and_check(shared_llm, reference, rest)
    hits = _hits(plans)
    assert len(hits) == len(rest) and all(start == len(document) for _, start in hits)
    snapshot = shared_llm.snapshot()
    assert snapshot.prefix_cache_hits == len(rest) and snapshot.prefix_cache_hit_rate > 0.5
    _check_pages(shared_llm)


def test_a_suffix_goes_to_the_instance_holding_its_prefix(shared_llm, reference):
    # One request per prefill group: the filler takes instance 0, the document instance 1.
    shared_llm.set_policy("fixed", 1, 1, policy_options={"max_admit": 1}, warmup=False)
    vocab = shared_llm.config.vocab_size
    document = _document(vocab, seed=11)
    plans = record_plans(shared_llm)
    filler = np.random.default_rng(12).integers(4, vocab, size=20).tolist()
    (question,) = _questions(vocab, document, 1, seed=13)
    _generate_and_check(shared_llm, reference, [filler, document + [5]])
    (doc_batch,) = [b for plan in plans for b in plan.prefills if len(b.request_ids) and b.chunks[0][1] == 61]
    assert doc_batch.group != (0,)
    plans.clear()
    # Instance 0 is idle and first in line; the prefix lives on the document's instance.
    _generate_and_check(shared_llm, reference, [question])
    assert _hits(plans) == [(doc_batch.group, len(document))]
    _check_pages(shared_llm)


def test_a_partly_evicted_prefix_is_reused_as_far_as_it_lasts(shared_llm, reference):
    document, second = _cache_a_document(shared_llm, reference, 21, "fixed", 1, 1)
    allocator = shared_llm.engine.state.allocator
    (instance,) = [i for i in range(allocator.num_instances) if allocator.pages_cached(i)]
    cached_blocks = allocator.pages_cached(instance)  # the first question's full pages, document and beyond
    # Another request's allocation takes every free page and the 5 least recently used idle cached pages:
    # the deepest pages of the document's chain go first.
    raw_free = allocator.pages_free(instance) - allocator.prefix_cache.num_idle(instance)
    allocator.allocate("pressure", instance, (raw_free + 5) * PAGE_SIZE)
    allocator.free_request("pressure")
    plans = record_plans(shared_llm)
    _generate_and_check(shared_llm, reference, [second])
    kept = min(cached_blocks - 5, len(document) // PAGE_SIZE) * PAGE_SIZE
    assert 0 < kept < len(document)
    assert [start for _, start in _hits(plans)] == [kept]
    _check_pages(shared_llm)


def test_preempting_a_request_on_cached_pages_keeps_tokens_and_pages_exact(shared_llm, reference):
    document, second = _cache_a_document(shared_llm, reference, 31, "fixed", 1, 1)
    engine, preempted = shared_llm.engine, []

    def preempt_once(view):  # once the request on cached pages decodes, it is preempted (recompute)
        for request in view.decoding:
            if not preempted and not request.in_flight and request.num_generated >= 2:
                preempted.append(request.request_id)
                return Plan(preemptions=(Preemption(request.request_id),))
        return None

    _override_policy(shared_llm, preempt_once)
    plans = record_plans(shared_llm)
    _generate_and_check(shared_llm, reference, [second])
    assert preempted and engine.state.counters["preemptions"] == 1
    before, after = [start for _, start in _hits(plans)]  # its own full prompt pages are cached by then
    assert before == len(document) and after >= len(document)
    _check_pages(shared_llm)


def test_the_benchmark_reports_both_modes_side_by_side():
    """`benchmarks/prefix_cache.py`'s report (the measured run itself takes minutes: BENCHMARKS.md)."""
    import argparse

    from tests.scripts import load_benchmark_script

    script = load_benchmark_script("prefix_cache")
    document = list(range(5, 25))
    questions = script.questions_on(document, 3, 100, seed=0)
    assert all(q[:20] == document and 16 <= len(q) - 20 <= 40 for q in questions)
    args = argparse.Namespace(questions=3, document_tokens=20, page_size=16, max_tokens=2)
    groups, compiles = [(0, 1)] * 3, {"compiles": [0, 1, 0]}
    cached = {"ttft": [1.0, 0.1, 0.05], "tokens": [[1], [2], [3]], "hits": 2, "hit_rate": 0.8, "policy": "esp",
              "groups": groups, **compiles}
    uncached = {"ttft": [1.0, 1.0, 1.0], "tokens": [[1], [2], [3]], "hits": 0, "hit_rate": 0.0, "policy": "esp",
                "groups": groups, "compiles": [0, 0, 0]}
    lines = script.report(cached, uncached, args)
    assert "13.3x lower" in lines[-2] and lines[-1].endswith("True")
    assert lines[3].endswith("(0, 1), 1 | (0, 1), 0")  # question 2: its group and compilations in both modes


def test_a_suffix_kept_on_other_instances_than_its_prefix_matches_the_reference(shared_llm, reference):
    """The prefix lives on one instance; the suffix's KV is kept on three others only (the prefix's instance
    joins the ring to serve its cached pages and keeps nothing new), and the request then decodes over all
    four (multi-master decode)."""
    keepers = (5, 6, 7)
    document, second = _cache_a_document(shared_llm, reference, 41, "esp")
    scripted = []

    def suffix_elsewhere(view):  # the hit's suffix is kept on `keepers`, a ring around its prefix's instance
        for request in view.waiting:
            if request.cached_tokens and not scripted:
                (home,) = request.cached_kv
                assert home not in keepers
                length = request.prefill_target - request.cached_tokens
                shares = [length // len(keepers) + (k < length % len(keepers)) for k in range(len(keepers))]
                batch = PrefillBatch((home, *keepers), (request.request_id,), ((request.cached_tokens, length),),
                                     (tuple((i, n) for i, n in zip(keepers, shares) if n),))
                scripted.append(batch)
                return Plan(prefills=(batch,))
        return None

    _override_policy(shared_llm, suffix_elsewhere)
    _generate_and_check(shared_llm, reference, [second])
    (batch,) = scripted
    assert batch.group[0] not in batch.kept_instances and batch.chunks[0][0] == len(document)
    _check_pages(shared_llm)
