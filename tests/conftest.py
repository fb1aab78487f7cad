"""Test set-up: 8 simulated CPU devices, configured before anything touches JAX."""

import logging
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# The engine's shared fixtures (a tiny checkpoint, its reference model, one LLM whose compiled programs
# the engine, sampling and entry-point tests reuse), registered once for the whole suite.
from tests.engine_fixtures import (  # noqa: E402,F401
    checkpoint_dir,
    compile_cache_dir,
    reference,
    reference_model,
    shared_llm,
)
from tests.bench_fixtures import compile_cache, tiny_checkpoint  # noqa: E402,F401  (bench and eval tests)


@pytest.fixture(autouse=True)
def pristine_loong_jax_logging():
    """`loong-jax serve` (and `configure_logging`) give loong_jax's logger a handler and stop its propagation:
    after every test, the logger is put back as Python made it, so no test's set-up hides records from
    a later test's `caplog`."""
    yield
    logger = logging.getLogger("loong_jax")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True

