"""The incremental deadline queue (`esp.deadline_index.DeadlineIndex`, used by `QueueDiscipline.head`) gives
exactly the order `esp.queue.deadline_order` computes from scratch, call after call, while requests
arrive, leave, come back and grow late, and a policy's late count and rejections (never fitting, or
refused by admission control) are the same."""

import math
import random

import pytest

from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.esp.queue import QueueDiscipline, deadline_order, never_fits_test
from loong_jax.scheduler.view import RequestView

from tests.scheduler.helpers import instances, view


def from_scratch(discipline: QueueDiscipline, snapshot, never_fits, limit):
    """What `head` answered before the index: a full scan, triage, then the first `limit`."""
    waiting = snapshot.view.waiting

    def refused(request):
        return never_fits(request) or (discipline.admission and discipline._past_deadline(snapshot, request))

    rejections = tuple(r.request_id for r in waiting if refused(r))
    servable = [r for r in waiting if not refused(r)]
    return rejections, discipline.order(snapshot, servable)[:limit], discipline.late_requests


@pytest.mark.parametrize("admission", [False, True])
def test_the_index_matches_a_full_rescan_over_a_random_run(admission):
    rng = random.Random(5)
    incremental = QueueDiscipline("deadline", starvation_limit=2.0, admission=admission)
    rescan = QueueDiscipline("deadline", starvation_limit=2.0, admission=admission)
    waiting: list[RequestView] = []
    seq, now = 0, 0.0
    cluster = instances([2000] * 2, total=2000)
    for step in range(300):
        now += rng.expovariate(2.0)
        for _ in range(rng.randint(0, 5)):  # arrivals: chats, documents, a few too large ever to fit
            length = rng.choice([rng.randint(10, 300), rng.randint(2_000, 24_000), 80_000])
            waiting.append(RequestView(f"r{seq}", seq, now, length, max_new_tokens=rng.randint(8, 400)))
            seq += 1
        if waiting and rng.random() < 0.6:  # admissions leave the queue (rejections too: the engine drops them)
            for request in rng.sample(waiting, k=min(len(waiting), rng.randint(1, 3))):
                waiting.remove(request)
        state = view(cluster, tuple(sorted(waiting, key=lambda r: r.seq)), now=now)
        never_fits, facts = never_fits_test(state, None)
        expected = from_scratch(rescan, ClusterSnapshot.build(state, 512), never_fits, 16)
        rejections, queue = incremental.head(ClusterSnapshot.build(state, 512), never_fits, facts, 16)
        assert (rejections, queue, incremental.late_requests) == expected, f"step {step}"
        waiting = [r for r in waiting if r.request_id not in rejections]


def test_a_clock_running_backwards_rebuilds_the_index():
    discipline = QueueDiscipline("deadline")
    chat = RequestView("chat", 0, 0.0, 100, max_new_tokens=16)
    late_view = view(instances([400] * 2, total=400), (chat,), now=1e6)
    never_fits, facts = never_fits_test(late_view, None)
    discipline.head(ClusterSnapshot.build(late_view, 512), never_fits, facts, 8)
    assert discipline.late_requests == 0  # waited far beyond its budget: overdue, served first
    early_view = view(instances([400] * 2, total=400), (chat,), now=0.1)
    _, queue = discipline.head(ClusterSnapshot.build(early_view, 512), never_fits, facts, 8)
    timely, _ = deadline_order(ClusterSnapshot.build(early_view, 512), [chat], math.inf, discipline.starvation_limit)
    assert queue == timely == [chat]
