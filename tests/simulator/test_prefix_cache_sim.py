"""The simulator's shared-document workloads and prefix-cache hits: a document's later questions prefill only
their suffix (priced as a suffix attending to the prefix), for ESP and the baselines, whether the questions
arrive together or spread over the run; every page is free or cached at the end."""

from __future__ import annotations

import numpy as np
import pytest

from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.scheduler.policy import PolicySpec
from loong_jax.simulator.run import simulate
from loong_jax.simulator.steady import capacity_bound
from loong_jax.simulator.workloads import make_workload
from tests.scheduler.helpers import synthetic_cost


@pytest.mark.parametrize("arrivals", ["close", "spread"])
def test_document_workloads_share_documents(arrivals):
    workload = make_workload("leval-docs", 20, seed=3, questions_per_document=4, document_arrivals=arrivals)
    requests = workload.requests(2.0)
    assert workload.name == f"leval-docs4-{arrivals}" and len(requests) == 20
    by_document: dict[int, list] = {}
    for request in requests:
        by_document.setdefault(request.document, []).append(request)
        assert 0 < request.document_len < request.input_len
    assert len(by_document) == 5 and all(len(r) == 4 for r in by_document.values())
    assert all(len({r.document_len for r in rs}) == 1 for rs in by_document.values())
    times = [r.arrival_time for r in requests]
    assert times == sorted(times)
    spans = [max(r.arrival_time for r in rs) - min(r.arrival_time for r in rs) for rs in by_document.values()]
    if arrivals == "close":  # a burst per document, well inside the mean gap between documents (2 s here)
        assert max(spans) < 1.0
    with pytest.raises(ValueError, match="document arrivals"):
        make_workload("leval-docs", 4, document_arrivals="sometimes")


@pytest.mark.parametrize("arrivals", ["close", "spread"])
@pytest.mark.parametrize("policy", ["esp", "replicas", "static-sp:degree=2", "fixed:prefill_degree=2"])
def test_later_questions_hit_and_wait_less(policy, arrivals):
    cost = synthetic_cost(page_size=16, pages_per_instance=2000, max_dop=8)
    requests = make_workload("leval-docs", 12, seed=5, questions_per_document=4,
                             document_arrivals=arrivals).requests(0.5)
    check = (policy, arrivals) == ("esp", "close")  # recounting every page after every event is slow
    runs = {enabled: simulate(requests, PolicySpec.parse(policy), cost, 8, request_rate=0.5, check_invariants=check,
                              prefix_cache=PrefixCacheOptions(enabled=enabled))
            for enabled in (True, False)}
    assert runs[False].counters["prefix_cache_hits"] == 0
    assert runs[True].counters["prefix_cache_hits"] >= 9 - 1  # every question but a document's first
    ttft = {enabled: np.mean([r.ttft for r in run.records]) for enabled, run in runs.items()}
    assert ttft[True] < ttft[False]


def test_the_capacity_bound_counts_cached_documents_once():
    cost = synthetic_cost(page_size=16, pages_per_instance=4000, max_dop=8)
    requests = make_workload("leval-docs", 16, seed=5, questions_per_document=4).requests(1.0)
    assert capacity_bound(requests, cost, 8) > 1.3 * capacity_bound(requests, cost, 8, prefix_cache=False)
