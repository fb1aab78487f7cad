"""The sampler's optional stages are chosen on the host (`SamplerPaths`), never by a branch on device values:
no conditional in the sampler compiled for a GPU (there each one is a host round trip; a CPU keeps one, to
skip the full sort when every row settled), and the same tokens as with every stage compiled in."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from loong_jax.sampling.batch import (ALL_PATHS, NO_PATHS, PLAIN_GREEDY, TOP_CANDIDATES, SamplerPaths, SamplingRow,
                                      SamplingSignature, greedy_batch, num_logprobs_columns, pack_sampling_batch,
                                      sampler_paths, sampling_signature)
from loong_jax.sampling.params import SamplingParams
from loong_jax.sampling.sampler import sample, sample_logits, sample_tokens

VOCAB = 1024  # > TOP_CANDIDATES, so the full-sort stage exists
EOS = 0
BRANCHING_OPS = ("stablehlo.case", "stablehlo.if", "stablehlo.while")


def data_dependent_branches(module_text: str) -> list[str]:
    """The control-flow ops of a lowered module whose branch index comes from data. A `platform_dependent`
    choice lowers to a case on a constant (and cases on its result), which XLA folds away when it compiles."""
    branches = []
    for function in module_text.split("func.func")[1:]:  # SSA names are per function
        defined_by = dict(re.findall(r"(%[\w#]+) = \"?(stablehlo\.\w+)", function))
        for line in function.splitlines():
            op = next((op for op in BRANCHING_OPS if op in line), None)
            if op is None:
                continue
            index = re.search(r"stablehlo\.case\"\((%[\w#]+)\)", line)
            if op != "stablehlo.case" or defined_by.get(index.group(1)) not in ("stablehlo.constant", "stablehlo.case"):
                branches.append(line.strip())
    return branches


def _rows(*params: SamplingParams) -> list[SamplingRow]:
    return [SamplingRow(p, [3, 4, 5], [6, 7], index) for index, p in enumerate(params)]


GREEDY = SamplingParams(temperature=0.0)
ROW_SETS = {
    "greedy with logprobs": _rows(dataclasses.replace(GREEDY, logprobs=2), GREEDY),
    "greedy with a penalty": _rows(dataclasses.replace(GREEDY, repetition_penalty=1.2)),
    "temperature only": _rows(SamplingParams(temperature=0.8, seed=1), GREEDY),
    "small top_k": _rows(SamplingParams(temperature=0.8, seed=2, top_k=40, top_p=0.5)),
    "top_p alone": _rows(SamplingParams(temperature=1.5, seed=3, top_p=0.95), GREEDY),
    "wide top_k": _rows(SamplingParams(temperature=1.0, seed=4, top_k=TOP_CANDIDATES + 1)),
    "everything": _rows(SamplingParams(temperature=0.9, seed=5, top_p=0.9, min_p=0.05, presence_penalty=0.3,
                                       frequency_penalty=0.1, logprobs=3), GREEDY),
}


def test_paths_name_the_stages_the_rows_need():
    assert sampler_paths(ROW_SETS["greedy with logprobs"]) == NO_PATHS
    assert sampler_paths(ROW_SETS["greedy with a penalty"]) == SamplerPaths(True, False, False, False)
    assert sampler_paths(ROW_SETS["temperature only"]) == SamplerPaths(False, True, False, False)
    assert sampler_paths(ROW_SETS["small top_k"]) == SamplerPaths(False, True, True, False)  # settles in the head
    assert sampler_paths(ROW_SETS["top_p alone"]) == SamplerPaths(False, True, True, True)
    assert sampler_paths(ROW_SETS["wide top_k"]) == SamplerPaths(False, True, True, True)
    assert sampler_paths(ROW_SETS["everything"]) == ALL_PATHS
    # A greedy row's top_k / top_p are never applied: they ask for nothing.
    assert sampler_paths(_rows(dataclasses.replace(GREEDY, top_p=0.5, logprobs=1))) == NO_PATHS


def _lowered(paths: SamplerPaths, platform: str) -> str:
    rows = ROW_SETS["everything"]
    batch = pack_sampling_batch(rows, VOCAB, [EOS], batch_bucket=4)
    logits = np.zeros((4, VOCAB), np.float32)
    traced = jax.jit(sample_logits, static_argnums=(2, 3)).trace(logits, batch, num_logprobs_columns(rows), paths)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("paths", [ALL_PATHS, NO_PATHS, SamplerPaths(True, True, True, False)])
def test_sampler_compiled_for_a_gpu_has_no_data_dependent_branch(paths):
    assert data_dependent_branches(_lowered(paths, "cuda")) == []


def test_on_a_cpu_the_select_runs_only_when_a_row_did_not_settle():
    def cases(paths):  # (a CPU's random bits come from a loop of fixed length: not a branch on data)
        return [line for line in data_dependent_branches(_lowered(paths, "cpu")) if "stablehlo.case" in line]

    # A branch is cheap there: one on whether a row did not settle, inside it one on whether any has a top_k.
    assert len(cases(ALL_PATHS)) == 2
    assert cases(SamplerPaths(True, True, True, False)) == []


@pytest.mark.parametrize("name", sorted(ROW_SETS))
@pytest.mark.parametrize("spread", [3.0, 0.02])  # peaked logits settle among the candidates; flat ones need the sort
def test_needed_paths_give_the_tokens_and_logprobs_of_all_paths(name, spread):
    rows = ROW_SETS[name]
    logits = (np.random.default_rng(len(name)).normal(0, spread, (4, VOCAB))).astype(np.float32)
    batch = pack_sampling_batch(rows, VOCAB, [EOS], batch_bucket=4)
    columns = num_logprobs_columns(rows)
    needed = sample(logits, batch, num_top_logprobs=columns, paths=sampler_paths(rows))
    everything = sample(logits, batch, num_top_logprobs=columns, paths=ALL_PATHS)
    np.testing.assert_array_equal(np.asarray(needed), np.asarray(everything))


def test_program_signature_carries_the_paths():
    rows = ROW_SETS["top_p alone"]
    batch = pack_sampling_batch(rows, VOCAB, [EOS], batch_bucket=4)
    assert sampling_signature(rows, batch).paths == sampler_paths(rows)
    greedy_rows = _rows(GREEDY, GREEDY)
    assert sampling_signature(greedy_rows, greedy_batch(greedy_rows, VOCAB, [EOS])) == PLAIN_GREEDY
    # A hand-made key's plain tuple, without the paths, compiles every stage in (right for any batch).
    signature = tuple(sampling_signature(rows, batch))[:-1]
    logits = np.random.default_rng(0).normal(0, 0.02, (4, VOCAB)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(sample_tokens, static_argnums=2)(logits, batch,
                                                                                      SamplingSignature(*signature))),
                                  np.asarray(sample(logits, batch, paths=sampler_paths(rows))))
