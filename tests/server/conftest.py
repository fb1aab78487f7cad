"""Fixtures of the server tests: one engine for the whole session, servers over it per module.

The server is thin, so several servers (plain, TLS, API keys, small queue) can share one `AsyncLLM`
on the shipped demo model; that keeps the compile and load cost to one engine.
"""

from __future__ import annotations

import pytest

from loong_jax.models.demo import DEMO_MODEL_DIR
from tests.server.harness import LoopThread, start_server

ENGINE_INSTANCES = 2
ENGINE_KV_PAGES = 256


@pytest.fixture(scope="session")
def model_dir():
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def loop_thread():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def engine(model_dir):
    from loong_jax.entrypoints.async_llm import AsyncLLM

    async_llm = AsyncLLM(model=str(model_dir), instances=ENGINE_INSTANCES, kv_pages=ENGINE_KV_PAGES,
                         progress=False)
    yield async_llm
    async_llm.shutdown()


@pytest.fixture(scope="session")
def engine_port(engine, model_dir):
    from loong_jax.server.engine_port import EnginePort

    return EnginePort.wrap(engine, model_dir)


@pytest.fixture(scope="session")
def reference_llm(model_dir):
    """A second engine, on ONE instance: the streamed answers must equal its LLM.generate."""
    from loong_jax.entrypoints.llm import LLM

    llm = LLM(model=str(model_dir), instances=1, kv_pages=ENGINE_KV_PAGES, progress=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(loop_thread, engine_port):
    handle = start_server(loop_thread, engine_port, max_message_bytes=256 * 1024, metrics_port=0)
    yield handle
    handle.stop()
