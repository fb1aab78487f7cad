"""The requests of a benchmark run: synthetic workloads, ShareGPT-format JSON, or a JSONL of prompts.

Every request is sent as token ids, so its prompt length in tokens is exact and the server does no
tokenizing during the run.

Data flow:
  1. Synthetic (`synthetic_requests`): input and output lengths come from the simulator's generators
     (`loong_jax.simulator.workloads.sample_lengths`: sharegpt, leval, lveval, mixed, zipf), are multiplied
     by `length_scale` (outputs by `output_scale`, default the same: to shrink a long-context workload for
     a CPU) and clipped to the server's context;
     each prompt is `input_len` token ids drawn from the model's vocabulary (`Vocabulary`: every id that is
     not a special token). Output lengths are exact when the run sets `ignore_eos`. The shared-document
     workloads (leval-docs, lveval-docs: `simulator.workloads.make_document_workload`) give every question
     of a document the same document tokens followed by its own question tokens, in the workload's arrival
     order ("close": a document's questions one after another; "spread": scattered over the run), so a
     server with a prefix cache reuses the document's KV.
  2. ShareGPT JSON (`sharegpt_requests`): the first human turn of each conversation is the prompt, the token
     count of the reply is the output length (or `fixed_output_len`); pairs with fewer than 4 tokens on
     either side, or that do not fit the context, are skipped; the rest are shuffled with the seed.
  3. JSONL (`jsonl_requests`): one object per line with `prompt` (text), `prompt_token_ids` or `messages`
     (chat), and `output_len` (or `max_tokens`).
  Text and chat prompts are tokenized by the `tokenize` callable the caller gives (the server's own
  Tokenize call, so lengths are what the server sees).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from loong_jax.simulator.workloads import DOCUMENT_WORKLOADS, WORKLOADS, make_document_workload, sample_lengths

MIN_SHAREGPT_TOKENS = 4
Tokenize = Callable[[Any], list[int]]  # text or chat messages -> token ids


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int  # max_tokens sent with the request

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Vocabulary:
    """Token ids a synthetic prompt may use: [0, size) minus the special ids."""

    size: int
    special_ids: frozenset[int] = frozenset()

    def __post_init__(self):
        if self.size - len({i for i in self.special_ids if 0 <= i < self.size}) < 1:
            raise ValueError(f"vocabulary of {self.size} ids has no ordinary token")

    def ordinary_ids(self) -> np.ndarray:
        ids = np.arange(self.size, dtype=np.int64)
        return ids[~np.isin(ids, np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids)))]

    def sample(self, rng: np.random.Generator, count: int) -> tuple[int, ...]:
        return tuple(int(i) for i in rng.choice(self.ordinary_ids(), size=count))


def scale_lengths(input_lens: np.ndarray, output_lens: np.ndarray, length_scale: float,
                  max_total_len: int | None, output_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Input lengths × length_scale, output lengths × output_scale (default: the same), at least 1 token
    each, then clipped so input + output <= max_total_len.

    Clipping keeps the output (at most half the context) and shortens the input: a long-document request
    stays a long-prompt request, only shorter.
    """
    output_scale = length_scale if output_scale is None else output_scale
    for name, scale in (("length scale", length_scale), ("output length scale", output_scale)):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{name} must be a positive number, got {scale}")
    inputs = np.maximum(1, np.rint(np.asarray(input_lens) * length_scale)).astype(np.int64)
    outputs = np.maximum(1, np.rint(np.asarray(output_lens) * output_scale)).astype(np.int64)
    if max_total_len is not None:
        if max_total_len < 2:
            raise ValueError(f"max_total_len must be >= 2, got {max_total_len}")
        outputs = np.minimum(outputs, max_total_len // 2)
        inputs = np.minimum(inputs, max_total_len - outputs)
    return inputs, outputs


def synthetic_requests(workload: str, num_prompts: int, vocabulary: Vocabulary, *, length_scale: float = 1.0,
                       output_scale: float | None = None, max_total_len: int | None = None, seed: int = 0,
                       zipf_alpha: float = 1.0, questions_per_document: int = 4,
                       document_arrivals: str = "close") -> list[BenchRequest]:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if workload in DOCUMENT_WORKLOADS:
        return document_requests(workload, num_prompts, vocabulary, length_scale=length_scale,
                                 output_scale=output_scale, max_total_len=max_total_len, seed=seed,
                                 questions_per_document=questions_per_document, arrivals=document_arrivals)
    length_rng, token_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    input_lens, output_lens = sample_lengths(workload, num_prompts, length_rng, zipf_alpha)
    inputs, outputs = scale_lengths(input_lens, output_lens, length_scale, max_total_len, output_scale)
    return [BenchRequest(vocabulary.sample(token_rng, int(n)), int(m)) for n, m in zip(inputs, outputs)]


def document_requests(workload: str, num_prompts: int, vocabulary: Vocabulary, *, length_scale: float = 1.0,
                      output_scale: float | None = None, max_total_len: int | None = None, seed: int = 0,
                      questions_per_document: int = 4, arrivals: str = "close") -> list[BenchRequest]:
    """Questions on shared documents (see the module docstring), in arrival order; a prompt clipped to the
    context keeps its document's first tokens."""
    shape = make_document_workload(workload.removesuffix("-docs"), num_prompts, seed, questions_per_document,
                                   arrivals)
    inputs, outputs = scale_lengths(shape.input_lens, shape.output_lens, length_scale, max_total_len, output_scale)
    document_lens, _ = scale_lengths(shape.document_lens, shape.output_lens, length_scale, None, output_scale)
    token_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    documents: dict[int, tuple[int, ...]] = {}
    requests = []
    for document, document_len, input_len, output_len in zip(shape.documents, document_lens, inputs, outputs):
        if int(document) not in documents:
            documents[int(document)] = vocabulary.sample(token_rng, int(document_len))
        text = documents[int(document)]
        question = vocabulary.sample(token_rng, max(1, int(input_len) - len(text)))
        requests.append(BenchRequest((text + question)[:int(input_len)], int(output_len)))
    return requests


def _fits(input_len: int, output_len: int, max_total_len: int | None) -> bool:
    return max_total_len is None or input_len + output_len <= max_total_len


def sharegpt_requests(path: str | Path, num_prompts: int, tokenize: Tokenize, *, seed: int = 0,
                      max_total_len: int | None = None, fixed_output_len: int | None = None) -> list[BenchRequest]:
    """Requests from a ShareGPT-format file: [{"conversations": [{"from": "human", "value": ...}, ...]}]."""
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        turns = entry.get("conversations") or entry.get("conversation") or []
        if len(turns) >= 2 and all(isinstance(t, dict) and "value" in t for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    np.random.default_rng(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if len(requests) == num_prompts:
            break
        prompt_ids = tokenize(prompt)
        output_len = fixed_output_len if fixed_output_len is not None else len(tokenize(reply))
        if len(prompt_ids) < MIN_SHAREGPT_TOKENS or output_len < MIN_SHAREGPT_TOKENS:
            continue
        if _fits(len(prompt_ids), output_len, max_total_len):
            requests.append(BenchRequest(tuple(prompt_ids), int(output_len)))
    if not requests:
        raise ValueError(f"{path}: no usable conversation (needs >= {MIN_SHAREGPT_TOKENS} tokens each side"
                         + (f" and a total within {max_total_len} tokens)" if max_total_len else ")"))
    return requests


def jsonl_prompt_ids(row: dict, tokenize: Tokenize) -> list[int]:
    if "prompt_token_ids" in row:
        return [int(t) for t in row["prompt_token_ids"]]
    if "prompt" in row:
        return tokenize(str(row["prompt"]))
    if "messages" in row:
        return tokenize(list(row["messages"]))
    raise ValueError(f"needs 'prompt', 'prompt_token_ids' or 'messages', got keys {sorted(row)}")


def jsonl_requests(path: str | Path, num_prompts: int | None, tokenize: Tokenize, *,
                   max_total_len: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file, in file order; a bad line fails with its line number."""
    requests = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if num_prompts is not None and len(requests) == num_prompts:
            break
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("a line must be a JSON object")
            ids = jsonl_prompt_ids(row, tokenize)
            output_len = int(row.get("output_len", row.get("max_tokens", 0)))
            if not ids or output_len < 1:
                raise ValueError("needs a non-empty prompt and output_len (or max_tokens) >= 1")
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        if not _fits(len(ids), output_len, max_total_len):
            raise ValueError(f"{path}:{line_number}: {len(ids)} prompt + {output_len} output tokens exceed "
                             f"the context of {max_total_len}")
        requests.append(BenchRequest(tuple(ids), output_len))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def length_summary(requests: Sequence[BenchRequest]) -> dict:
    inputs = np.array([r.input_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    return {"num_requests": len(requests),
            "input_len": {"mean": float(inputs.mean()), "min": int(inputs.min()), "max": int(inputs.max())},
            "output_len": {"mean": float(outputs.mean()), "min": int(outputs.min()), "max": int(outputs.max())}}


def special_ids_of(ids: Iterable[int | None]) -> frozenset[int]:
    return frozenset(int(i) for i in ids if i is not None)
