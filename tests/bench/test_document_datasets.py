"""`loong-jax bench`'s shared-document workloads: every question of a document starts with the same
document tokens, in the simulator's arrival order, scaled and clipped like the other synthetic workloads."""

import pytest

from loong_jax.bench.cli import build_parser
from loong_jax.bench.datasets import Vocabulary, synthetic_requests


@pytest.mark.parametrize("arrivals", ["close", "spread"])
def test_questions_share_their_document_tokens(arrivals):
    vocabulary = Vocabulary(300, frozenset({0, 1}))
    requests = synthetic_requests("leval-docs", 12, vocabulary, length_scale=0.01, output_scale=0.05,
                                  max_total_len=400, seed=2, questions_per_document=3, document_arrivals=arrivals)
    assert len(requests) == 12 and all(r.input_len + r.output_len <= 400 for r in requests)
    assert all(0 not in r.prompt_token_ids and 1 not in r.prompt_token_ids for r in requests)
    # Group by the longest shared start: each document's three questions share its tokens.
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.prompt_token_ids[:20], []).append(index)
    assert sorted(len(g) for g in groups.values()) == [3, 3, 3, 3]
    if arrivals == "close":  # a document's questions come one after another
        assert all(g == list(range(g[0], g[0] + 3)) for g in groups.values())
    again = synthetic_requests("leval-docs", 12, vocabulary, length_scale=0.01, output_scale=0.05,
                               max_total_len=400, seed=2, questions_per_document=3, document_arrivals=arrivals)
    assert again == requests


def test_bench_flags_for_documents():
    args = build_parser().parse_args(["--workload", "lveval-docs", "--questions-per-document", "8",
                                      "--document-arrivals", "spread"])
    assert (args.workload, args.questions_per_document, args.document_arrivals) == ("lveval-docs", 8, "spread")
