"""loong_jax: serving long-context language models with elastic sequence parallelism.

The names vLLM users type, `from loong_jax import LLM, AsyncLLM, SamplingParams`, are imported on first
use (PEP 562 `__getattr__`): `import loong_jax` alone, and so `loong-jax --help`, does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "__version__"]

# public name -> the module that defines it
_LAZY_EXPORTS = {
    "LLM": "loong_jax.entrypoints.llm",
    "AsyncLLM": "loong_jax.entrypoints.async_llm",
    "SamplingParams": "loong_jax.sampling.params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loong_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)  # sys.modules caches the import


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
