"""Programs are compiled once per (kind, group, bucket): after a warm-up, repeating a workload compiles
nothing (counted with JAX's own compile logging and with the program cache's statistics), and the
persistent compilation cache holds the programs on disk. The `ProgramCache` itself: hits, waits,
background compilation, errors."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from loong_jax.executor.program_cache import ProgramCache, ProgramKey
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import mixed_prompts

# JAX logs every compilation ("Compiling <name> ...") when jax_log_compiles is on.
_COMPILING = re.compile(r"Compiling (\w+)")


@contextlib.contextmanager
def jax_compilations():
    counts: collections.Counter[str] = collections.Counter()

    class Handler(logging.Handler):
        def emit(self, record):
            match = _COMPILING.search(record.getMessage())
            if match:
                counts[match.group(1)] += 1

    handler = Handler(level=logging.DEBUG)
    jax_logger = logging.getLogger("jax")
    previous_level = jax_logger.level
    jax_logger.addHandler(handler)
    jax_logger.setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    try:
        yield counts
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(handler)
        jax_logger.setLevel(previous_level)


def test_repeated_run_compiles_nothing(shared_llm):
    shared_llm.set_policy("fixed", 8, 4, warmup=True)  # compiles this policy's common programs
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=16, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first = shared_llm.generate(prompts, params, use_tqdm=False)  # any other bucket it needs
    shared_llm.executor.programs.wait_background()
    stats_before = shared_llm.executor.programs.stats.as_dict()
    # The same workload again: with the first run's prompts cached it would reuse them (other programs).
    shared_llm.engine.state.allocator.clear_prefix_cache()
    with jax_compilations() as compilations:
        second = shared_llm.generate(prompts, params, use_tqdm=False)
    stats_after = shared_llm.executor.programs.stats.as_dict()
    assert sum(compilations.values()) == 0, dict(compilations)
    assert stats_after["compiles"] == stats_before["compiles"]
    assert stats_after["hits"] > stats_before["hits"]
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    assert any(shared_llm.compilation_cache_dir.iterdir())  # the persistent cache holds compiled programs
    # The scheduler is told which programs are ready.
    ready = shared_llm.executor.ready_programs()
    assert ("prefill", tuple(range(8)), 16) in ready and ("decode", (0, 1, 2, 3), 16) in ready


def test_counting_sees_a_compilation():
    """The counter above is live: a fresh function shape is seen being compiled."""
    with jax_compilations() as compilations:
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0))
    assert sum(compilations.values()) >= 1


def _lowering(key: ProgramKey):
    if key.kind == "broken":
        raise RuntimeError("cannot lower this program")
    size = key.bucket[0]
    return jax.jit(lambda x: x + size).lower(jax.ShapeDtypeStruct((size,), jnp.float32))


def test_program_cache_statistics_and_background():
    cache = ProgramCache(_lowering)
    try:
        small, large = ProgramKey("add", (0,), (4,)), ProgramKey("add", (0,), (8,))
        cache.warm_up([small, small], progress=True)
        assert cache.is_ready(small) and cache.stats.compiles == 1
        assert cache.get(small) is cache.get(small) and cache.stats.hits == 2
        future = cache.request(large)
        program = future.result(timeout=60)
        assert float(program(jnp.zeros(8, jnp.float32))[0]) == 8.0
        assert cache.stats.background_compiles == 1 and cache.ready_keys() == {small, large}
        assert cache.stats.compile_seconds > 0
        with pytest.raises(RuntimeError, match="cannot lower"):
            cache.get(ProgramKey("broken", (0,), (1,)))
        assert not cache.is_ready(ProgramKey("broken", (0,), (1,)))
    finally:
        cache.close()


GREEDY_SIGNATURE = (8, 1, 1, None, True)  # sampling.batch.PLAIN_GREEDY, as a plain tuple


@pytest.mark.parametrize("key, label", [
    (ProgramKey("prefill", tuple(range(8)), (16, 8, GREEDY_SIGNATURE)),
     "prefill d=8 (0-7) rows<=16 requests<=8 greedy"),
    (ProgramKey("prefill_context", (2, 3), (32, 4, 64, (8, 16, 16, 5, False))),
     "prefill_context d=2 (2,3) rows<=32 requests<=4 pages<=64 sampling logprobs<=5"),
    (ProgramKey("decode", (3,), (8, 64, (8, 32, 32, None, False))), "decode d=1 (3) batch<=8 pages<=64 sampling"),
    (ProgramKey("decode", (0, 2, 4, 6), (8, 64, GREEDY_SIGNATURE)), "decode d=4 (0,2,4,6) batch<=8 pages<=64 greedy"),
    (ProgramKey("migrate", (1, 5), (64,)), "migrate 1->5 slots<=64"),
    (ProgramKey("add", (0,), (4,)), "add d=1 (0) (4,)"),  # a kind without a field table
])
def test_program_key_describe_is_readable(key, label):
    assert key.describe() == label
    assert str(key).startswith(key.kind + "[")  # the exact key stays available for logs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warm_up_progress_only_on_a_terminal(capsys, monkeypatch):
    cache = ProgramCache(_lowering)
    prefill = ProgramKey("prefill", (0, 1, 2, 3), (16, 8, GREEDY_SIGNATURE))
    try:
        cache.warm_up([ProgramKey("add", (0,), (4,))], progress=True)
        assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar, no escape codes
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        cache.warm_up([prefill], progress=True)
        assert "compiling programs" in terminal.getvalue()
        assert "prefill d=4 (0-3) rows<=16 requests<=8 greedy" in terminal.getvalue()  # not the raw key
    finally:
        cache.close()
