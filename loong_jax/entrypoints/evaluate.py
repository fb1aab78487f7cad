"""`loong-jax eval`: batch evaluation, a JSONL file of prompts -> a JSONL file of answers, no server.

Input, one JSON object per line:
  {"id": "q1", "prompt": "text"}                       or "messages": [{"role": ..., "content": ...}, ...]
  {"id": "q2", "prompt_token_ids": [1, 2, 3], "max_tokens": 32, "temperature": 0.7, "seed": 1}
  Sampling fields (any `SamplingParams` field) may sit at the top level or in "sampling_params"; the
  command's flags give the defaults (greedy, --max-tokens 128). A line without "id" is named "line-N".
Output, one line per input line:
  {"id", "text", "token_ids", "finish_reason", "usage": {prompt_tokens, completion_tokens, total_tokens},
   "timings": {queue_s, ttft_s, decode_s, e2e_s}}  (+ "outputs" with every sample when n > 1), or
  {"id", "line", "error"} for a line that could not be run (bad JSON, a bad field, a prompt too long).

Data flow:
  1. Read what the output file already holds (a torn last line from a killed run is cut off): those ids
     are done and skipped (`--retry-errors` runs the error lines again).
  2. Parse every remaining input line; a bad one becomes an error line at once.
  3. Load the model (`LLM`), then, `--batch-size` requests at a time: validate each (`LLM.prepare`: an
     invalid request becomes an error line), run the rest together (`LLM.generate`, continuous batching
     inside the engine) and append their answers, flushed after every batch, so an interrupted run loses at
     most one batch. A progress bar counts lines (on a terminal only; so does the compile progress).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from loong_jax.entrypoints.cli import (add_engine_arguments, add_sampling_arguments, engine_kwargs_from_args,
                           sampling_params_from_args)
from loong_jax.entrypoints.prompts import check_messages, check_text
from loong_jax.sampling.params import SamplingParams

PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")


@dataclass
class EvalItem:
    id: str
    line: int
    prompt: dict  # {"prompt": text} or {"messages": chat} or {"prompt_token_ids": ids}: LLM's dict form
    sampling: SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong-jax eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="JSONL of requests")
    parser.add_argument("output", type=Path, help="JSONL of answers (appended to; existing ids are skipped)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests handed to the engine at once")
    parser.add_argument("--retry-errors", action="store_true", help="run again the ids that have an error line")
    parser.add_argument("--no-progress", action="store_true")
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Resume: what the output already holds.
# ---------------------------------------------------------------------------------------------------------------
def cut_torn_tail(path: Path) -> None:
    """Drop a last line that is not complete JSON (the run that wrote it was killed mid-write)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data:
        return
    end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    if end == len(data):
        return
    with path.open("r+b") as handle:
        handle.truncate(end)


def finished_ids(path: Path, retry_errors: bool) -> set[str]:
    done: set[str] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("id") is not None and not (retry_errors and "error" in row):
            done.add(str(row["id"]))
    return done


# ---------------------------------------------------------------------------------------------------------------
# Input lines -> items.
# ---------------------------------------------------------------------------------------------------------------
def line_id(row: Any, line: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return str(row["id"])
    return f"line-{line}"


def parse_item(row: Any, line: int, defaults: dict) -> EvalItem:
    """One input object -> an EvalItem (ValueError with the reason otherwise)."""
    if not isinstance(row, dict):
        raise ValueError(f"a line must be a JSON object, got {type(row).__name__}")
    given = [key for key in PROMPT_KEYS if key in row]
    if len(given) != 1:
        raise ValueError(f"a line needs exactly one of {', '.join(PROMPT_KEYS)}, got {given or 'none'}")
    prompt = row[given[0]]
    if given[0] == "prompt":  # checked now, before the model loads; token ids need its vocabulary
        check_text(prompt, "prompt")
    elif given[0] == "messages":
        check_messages(prompt, "messages")
    elif not isinstance(prompt, list):
        raise ValueError(f"'{given[0]}' must be a list")
    nested = row.get("sampling_params", {})
    if not isinstance(nested, dict):
        raise ValueError("'sampling_params' must be an object")
    overrides = {key: value for key, value in row.items() if key in SamplingParams.field_names()}
    sampling = SamplingParams.from_dict({**defaults, **overrides, **nested})
    return EvalItem(line_id(row, line), line, {given[0]: prompt}, sampling)


def answer_line(item: EvalItem, output) -> dict:
    metrics = output.metrics
    completion_tokens = sum(len(sample.token_ids) for sample in output.outputs)
    row = {"id": item.id, "text": output.text, "token_ids": list(output.token_ids),
           "finish_reason": output.finish_reason,
           "usage": {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion_tokens,
                     "total_tokens": len(output.prompt_token_ids) + completion_tokens},
           "timings": {"queue_s": metrics.queue_time if metrics else None,
                       "ttft_s": metrics.time_to_first_token if metrics else None,
                       "decode_s": metrics.decode_time if metrics else None,
                       "e2e_s": metrics.latency if metrics else None}}
    if len(output.outputs) > 1:
        row["outputs"] = [{"index": s.index, "text": s.text, "token_ids": list(s.token_ids),
                           "finish_reason": s.finish_reason} for s in output.outputs]
    return row


def error_line(item_id: str, line: int, error: str) -> dict:
    return {"id": item_id, "line": line, "error": error}


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------
class Writer:
    def __init__(self, handle: TextIO, bar):
        self.handle, self.bar = handle, bar
        self.answers = self.errors = 0

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if "error" in row:
            self.errors += 1
        else:
            self.answers += 1
        if self.bar is not None:
            self.bar.update(1)


def run_batch(llm, items: list[EvalItem], writer: Writer) -> None:
    valid = []
    for item in items:
        try:
            llm.prepare(item.prompt, item.sampling)
            valid.append(item)
        except ValueError as error:
            writer.write(error_line(item.id, item.line, str(error)))
    if not valid:
        return
    try:
        outputs = llm.generate([i.prompt for i in valid], [i.sampling for i in valid], use_tqdm=False)
    except ValueError:
        if len(valid) == 1:
            raise
        for item in valid:  # find the request the engine refused; run the others anyway
            try:
                run_batch(llm, [item], writer)
            except ValueError as error:
                writer.write(error_line(item.id, item.line, str(error)))
        return
    for item, output in zip(valid, outputs):
        writer.write(answer_line(item, output))


def eval_main(argv: Sequence[str] | None = None, llm=None) -> int:
    """Run the command; `llm` lets a caller (a test) pass an already built engine."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        defaults = sampling_params_from_args(args).to_dict()
    except ValueError as error:
        parser.error(str(error))
    if not args.input.is_file():
        parser.error(f"input file not found: {args.input}")
    cut_torn_tail(args.output)
    done = finished_ids(args.output, args.retry_errors)

    pending: list[tuple[int, Any]] = []  # (line number, parsed row or the parse error)
    seen: set[str] = set()
    total = 0
    for number, text in enumerate(args.input.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        total += 1
        try:
            row: Any = json.loads(text)
        except json.JSONDecodeError as error:
            row = ValueError(f"bad JSON: {error}")
        key = line_id(row, number)
        if key in done:
            continue
        if key in seen:
            row = ValueError(f"duplicate id {key!r} (first seen on an earlier line)")
        seen.add(key)
        pending.append((number, row))

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        # disable=None: drawn on a terminal only, never as escape codes in a log file or a pipe
        bar = tqdm(total=total, initial=total - len(pending), desc="eval", unit="line", disable=None)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a", encoding="utf-8") as handle:
        writer = Writer(handle, bar)
        items: list[EvalItem] = []
        for number, row in pending:
            try:
                if isinstance(row, Exception):
                    raise row
                items.append(parse_item(row, number, defaults))
            except (ValueError, TypeError) as error:
                writer.write(error_line(line_id(row, number), number, str(error)))
        handle.flush()
        if items and llm is None:
            from loong_jax.entrypoints.llm import LLM  # imports JAX: only when there is work

            try:
                llm = LLM(**engine_kwargs_from_args(args), progress=not args.no_progress)
            except (ValueError, FileNotFoundError) as error:
                print(f"loong-jax eval: error: {error}", file=sys.stderr)
                return 2
        for start in range(0, len(items), args.batch_size):
            run_batch(llm, items[start:start + args.batch_size], writer)
            handle.flush()
    if bar is not None:
        bar.close()
    print(f"loong-jax eval: {writer.answers} answered, {writer.errors} errors, "
          f"{total - len(pending)} already done -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
