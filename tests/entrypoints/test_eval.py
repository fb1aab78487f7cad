"""`loong-jax eval`: answers equal the reference greedy loop, bad lines become error lines, resume skips done ids."""

from __future__ import annotations

import json

import pytest

from loong_jax.entrypoints.evaluate import eval_main
from loong_jax.models.generate import generate
from loong_jax.models.loading import load_hf_checkpoint
from tests.bench_fixtures import ENGINE

INPUT_LINES = [
    json.dumps({"id": "text", "prompt": "A batch file of prompts", "max_tokens": 6}),
    json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Every request"}],
                "sampling_params": {"max_tokens": 4}}),
    "{this is not json",
    json.dumps({"id": "ids", "prompt_token_ids": [5, 9, 17, 33], "max_tokens": 5}),
    json.dumps({"id": "hot", "prompt": "Benchmarks", "temperature": -1}),
    json.dumps({"id": "noprompt", "max_tokens": 3}),
    json.dumps({"id": "text", "prompt": "duplicate id"}),
    json.dumps({"id": "long", "prompt_token_ids": [5 + i % 250 for i in range(300)], "max_tokens": 5}),
    json.dumps({"prompt": "Every request streams", "max_tokens": 3}),  # no id: named line-9
]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, compile_cache):
    from loong_jax.entrypoints.llm import LLM

    engine = LLM(tiny_checkpoint, compilation_cache_dir=compile_cache, **ENGINE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    return load_hf_checkpoint(tiny_checkpoint)[0]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_answers_errors_and_resume(tmp_path, llm, reference_model):
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(INPUT_LINES) + "\n")
    assert eval_main([str(source), str(answers), "--no-progress", "--max-tokens", "7"], llm=llm) == 0
    rows = read_rows(answers)
    by_id = {row["id"]: row for row in rows}
    assert len(rows) == len(INPUT_LINES) == len(by_id)  # one line per input line, none twice

    # Good lines: the same tokens as the single-device reference loop (greedy by default).
    prompts = {"text": llm.tokenizer.encode("A batch file of prompts"), "ids": [5, 9, 17, 33],
               "chat": llm.tokenizer.apply_chat_template([{"role": "user", "content": "Every request"}],
                                                        tokenize=True),
               "line-9": llm.tokenizer.encode("Every request streams")}
    limits = {"text": 6, "ids": 5, "chat": 4, "line-9": 3}
    for key, prompt in prompts.items():
        row = by_id[key]
        expected = generate(reference_model, prompt, limits[key], eos_token_ids=llm.tokenizer.eos_token_ids)
        assert row["token_ids"] == expected.tokens, key
        assert row["finish_reason"] == expected.finish_reason
        assert row["text"] == llm.tokenizer.decode(expected.tokens)
        assert row["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected.tokens),
                                "total_tokens": len(prompt) + len(expected.tokens)}
        timings = row["timings"]
        assert 0 <= timings["queue_s"] <= timings["ttft_s"] <= timings["e2e_s"]

    # Bad lines are recorded with their reason and did not stop the run.
    assert "bad JSON" in by_id["line-3"]["error"] and by_id["line-3"]["line"] == 3
    assert "temperature" in by_id["hot"]["error"]
    assert "exactly one of" in by_id["noprompt"]["error"]
    assert "duplicate id" in by_id["line-7"]["error"]
    assert "error" in by_id["long"]  # a 300-token prompt does not fit the 256-token context

    # Resume: the run died after two answers, mid-way through writing the third.
    text = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(text[:2]) + text[2][:15])
    done_before = {json.loads(line)["id"] for line in text[:2]}
    assert eval_main([str(source), str(answers), "--no-progress", "--max-tokens", "7"], llm=llm) == 0
    resumed = read_rows(answers)  # parses: the torn line was cut off
    assert sorted(row["id"] for row in resumed) == sorted(by_id)
    assert resumed[:2] == rows[:2]  # the done lines are untouched
    for row in resumed[2:]:
        assert row["id"] not in done_before
        if "error" not in row:
            assert row["token_ids"] == by_id[row["id"]]["token_ids"]

    # A third run has nothing to do; --retry-errors runs the error lines again (and only them; line 7
    # repeats the id "text", which is done, so it is skipped as a done id).
    before = answers.read_text()
    assert eval_main([str(source), str(answers), "--no-progress"], llm=llm) == 0
    assert answers.read_text() == before
    assert eval_main([str(source), str(answers), "--no-progress", "--retry-errors"], llm=llm) == 0
    retried = read_rows(answers)[len(resumed):]
    assert sorted(row["id"] for row in retried) == sorted(k for k, row in by_id.items()
                                                          if "error" in row and k != "line-7")


def test_eval_writes_no_progress_noise_into_files_or_pipes(tmp_path, llm, capsys):
    """stderr is not a terminal here (a file, a pipe, a log): no bar, no carriage returns or escape codes."""
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "Benchmarks", "max_tokens": 2}) + "\n"
                      + json.dumps({"id": "empty", "prompt": ""}) + "\n"
                      + json.dumps({"id": "role", "messages": [{"role": 1, "content": "x"}]}) + "\n")
    assert eval_main([str(source), str(answers)], llm=llm) == 0  # progress on (no --no-progress)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    assert err.startswith("loong-jax eval: 1 answered, 2 errors")  # the summary is all there is
    rows = {row["id"]: row for row in read_rows(answers)}
    assert "the prompt is empty" in rows["empty"]["error"]
    assert "messages[0].role must be a non-empty string" in rows["role"]["error"]
