"""`loong_jax` itself: the names vLLM users import, and an import that stays free of JAX (so the CLI's
`--help` answers at once)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_import_loong_jax_does_not_import_jax():
    _run("import sys, loong_jax\n"
         "assert 'jax' not in sys.modules, 'import loong_jax imported JAX'\n"
         "from loong_jax import SamplingParams\n"
         "assert 'jax' not in sys.modules, 'SamplingParams imported JAX'\n"
         "assert SamplingParams().temperature == 1.0")


def test_vllm_style_names_import():
    import loong_jax
    from loong_jax import LLM, AsyncLLM, SamplingParams
    from loong_jax.entrypoints.async_llm import AsyncLLM as async_llm_class
    from loong_jax.entrypoints.llm import LLM as llm_class
    from loong_jax.sampling.params import SamplingParams as params_class

    assert (LLM, AsyncLLM, SamplingParams) == (llm_class, async_llm_class, params_class)
    assert {"LLM", "AsyncLLM", "SamplingParams"} <= set(dir(loong_jax)) & set(loong_jax.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        loong_jax.Engine
