"""Decode inputs kept between steps (`executor.decode_steps`): every step's program call is the one built from
scratch, through pages that fill, requests that join, finish or are preempted, KV that migrates, masters
that change, sampling parameters that change and greedy rows that stop masking their stop ids (min_tokens);
and the steps in between are advanced, not rebuilt. Host numpy only: no device, no model."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from loong_jax.executor.protocol import RequestInputs
from loong_jax.executor.unit_inputs import Buckets, UnitInputs
from loong_jax.sampling.batch import GreedyBatch, SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch

PAGE_SIZE = 4
# Seeded: an unseeded row of a batch that samples draws a fresh seed each step, which no two builds share.
GREEDY = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, seed=0)


class Books:
    """A minimal engine's books: per request its prompt, tokens generated, pages and tokens held per
    instance; pages come from one counter, so a re-allocated table never repeats an old one."""

    def __init__(self):
        self.pages = itertools.count(1)
        self.requests = {}

    def add(self, request_id, prompt_len, held, params=GREEDY):
        """A prefilled request: `held` tokens of its prompt per instance, its first token sampled."""
        assert sum(held.values()) == prompt_len
        self.requests[request_id] = {"prompt": tuple(range(5, 5 + prompt_len)), "generated": [7],
                                     "params": params, "held": dict(held), "tables": {}}
        for instance, tokens in held.items():
            self.requests[request_id]["tables"][instance] = [next(self.pages) for _ in range(-(-tokens // PAGE_SIZE))]

    def decode(self, request_id, master):
        """The request's newest token is appended on its master (a new page when the last one is full)."""
        request = self.requests[request_id]
        held = request["held"].get(master, 0) + 1
        request["held"][master] = held
        table = request["tables"].setdefault(master, [])
        if held > len(table) * PAGE_SIZE:
            table.append(next(self.pages))

    def inputs(self, request_ids):
        out = {}
        for request_id in request_ids:
            request = self.requests[request_id]
            row = SamplingRow(request["params"], request["prompt"], tuple(request["generated"]))
            out[request_id] = RequestInputs(row, {i: tuple(t) for i, t in request["tables"].items()},
                                            dict(request["held"]))
        return out

    def sampled(self, request_ids, step):
        for request_id in request_ids:
            self.requests[request_id]["generated"].append(10 + (step * 7 + request_id) % 50)


def assert_same_call(kept, built):
    assert kept.key == built.key and kept.next_key == built.next_key
    assert kept.sampled == built.sampled and kept.sampling_rows == built.sampling_rows
    kept_leaves, built_leaves = jax.tree.leaves(kept.inputs), jax.tree.leaves(built.inputs)
    assert len(kept_leaves) == len(built_leaves)
    for a, b in zip(kept_leaves, built_leaves):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


SMALL_BUCKETS = Buckets(decode_batch=2, decode_pages=2)  # 4 page entries per member: buckets grow in the runs


def run_steps(books, schedule, group, buckets=SMALL_BUCKETS):
    """Decode `schedule` (step -> (request_ids, masters), after an optional change to the books) with the
    kept inputs and with inputs built from scratch; every call must be the same. Returns steps advanced."""
    kept = UnitInputs(buckets, PAGE_SIZE, vocab_size=64, eos_token_ids=(1,))
    built = UnitInputs(buckets, PAGE_SIZE, vocab_size=64, eos_token_ids=(1,), keep_decode_steps=False)
    for step, (change, request_ids, masters) in enumerate(schedule):
        if change is not None:
            change(books)
        for request_id, master in zip(request_ids, masters):
            books.decode(request_id, master)
        batch = DecodeBatch(group, tuple(request_ids), tuple(masters))
        inputs = books.inputs(request_ids)
        assert_same_call(kept.decode(batch, inputs), built.decode(batch, inputs))
        books.sampled(request_ids, step)
    return kept.decode_steps.advanced


def test_steady_steps_are_advanced_through_new_pages_and_a_second_member():
    books = Books()
    books.add(0, 5, {0: 5})
    books.add(1, 9, {0: 4, 1: 5})  # KV on both members, master 1
    books.add(2, 3, {1: 3})
    schedule = [(None, [0, 1, 2], [0, 1, 1])] * 12  # each request crosses page boundaries at its own step
    # (pages enough for the whole run in the first bucket: a larger bucket is a new program, built afresh)
    advanced = run_steps(books, schedule, (0, 1), Buckets(decode_batch=2, decode_pages=8))
    assert advanced == 11  # every step after the first, new pages included


@pytest.mark.parametrize("event", ["preempted", "migrated", "new_request", "finished", "new_master",
                                   "new_params", "min_tokens", "pages_only", "other_member_pages"])
def test_any_change_rebuilds_what_it_changes(event):
    books = Books()
    books.add(0, 6, {0: 6})
    books.add(1, 7, {0: 3, 1: 4})
    books.add(2, 2, {1: 2}, params=SamplingParams(temperature=0.0, max_tokens=100, min_tokens=5, seed=0))
    ids, masters = [0, 1, 2], [0, 1, 1]

    def preempt(b):  # request 1 recomputed elsewhere: new pages, the same number of tokens held
        request = b.requests[1]
        request["tables"] = {i: [next(b.pages) for _ in t] for i, t in request["tables"].items()}

    def migrate(b):  # request 1's KV on instance 0 moves to its master, 1 (a page of its own there)
        request = b.requests[1]
        moved = request["held"].pop(0)
        request["tables"].pop(0)
        request["held"][1] += moved
        request["tables"][1] += [next(b.pages) for _ in range(-(-request["held"][1] // PAGE_SIZE)
                                                            - len(request["tables"][1]))]

    def other_member_pages(b):  # request 1's share on instance 0 (not its master) re-allocated
        request = b.requests[1]
        request["tables"][0] = [next(b.pages) for _ in request["tables"][0]]

    def pages_only(b):  # the same pages in another order: only the page tables tell
        request = b.requests[0]
        request["tables"][0] = request["tables"][0][::-1]

    steps = {
        "preempted": [(None, ids, masters)] * 3 + [(preempt, ids, masters)] + [(None, ids, masters)] * 3,
        "migrated": [(None, ids, masters)] * 3 + [(migrate, ids, masters)] + [(None, ids, masters)] * 3,
        "new_request": [(None, ids, masters)] * 3 + [(lambda b: b.add(3, 4, {0: 4}), ids + [3], masters + [0])]
        + [(None, ids + [3], masters + [0])] * 3,
        "finished": [(None, ids, masters)] * 3 + [(None, [0, 2], [0, 1])] * 3,
        "new_master": [(None, ids, masters)] * 3 + [(None, ids, [0, 0, 1])] * 3,
        "new_params": [(None, [0, 1], [0, 1])] * 3 + [  # (greedy rows, none masking stops: kept inputs)
            (lambda b: b.requests[0].update(params=SamplingParams(temperature=0.8, seed=3)), [0, 1], [0, 1])]
        + [(None, [0, 1], [0, 1])] * 3,
        "min_tokens": [(None, ids, masters)] * 8,  # request 2 masks its stop ids for its first 5 tokens
        "pages_only": [(None, ids, masters)] * 3 + [(pages_only, ids, masters)] + [(None, ids, masters)] * 3,
        "other_member_pages": [(None, ids, masters)] * 3 + [(other_member_pages, ids, masters)]
        + [(None, ids, masters)] * 3,
    }[event]
    assert run_steps(books, steps, (0, 1)) > 0


def kept_calls(params, steps=6):
    books = Books()
    books.add(0, 6, {0: 6}, params=params)
    kept = UnitInputs(SMALL_BUCKETS, PAGE_SIZE, vocab_size=64, eos_token_ids=(1,))
    calls = []
    for step in range(steps):
        books.decode(0, 0)
        calls.append(kept.decode(DecodeBatch((0,), (0,), (0,)), books.inputs([0])))
        books.sampled([0], step)
    return [call.inputs[1] for call in calls]


def test_sampling_inputs_are_advanced_once_no_row_masks_its_stop_ids():
    greedy = kept_calls(SamplingParams(temperature=0.0, max_tokens=100, min_tokens=3))
    assert all(isinstance(batch, GreedyBatch) for batch in greedy)
    assert greedy[0].stop_token_ids[0, 0] == 1 and greedy[-1].stop_token_ids[0, 0] == 64  # EOS masked, then not
    assert greedy[-1].stop_token_ids is greedy[-2].stop_token_ids  # advanced: only the steps are new
    assert greedy[-1].step is not greedy[-2].step and greedy[-2].step[0] + 1 == greedy[-1].step[0]
    seeded = kept_calls(SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=100))
    assert seeded[-1].temperature is seeded[-2].temperature and seeded[-1].seed_words is seeded[-2].seed_words


def test_unseeded_and_penalised_rows_are_packed_every_step():
    unseeded = kept_calls(SamplingParams(temperature=0.8, max_tokens=100))  # a fresh seed each step
    assert len({batch.seed_words[0].tobytes() for batch in unseeded}) == len(unseeded)
    penalised = kept_calls(SamplingParams(temperature=0.8, seed=5, presence_penalty=0.5, max_tokens=100))
    histories = [batch.output_token_ids[0] for batch in penalised]  # each step's history one token longer
    assert [int(np.sum(history < 64)) for history in histories] == list(range(1, len(penalised) + 1))
