"""The prefix cache's options: on by default, sized by a share of each instance's pages or switched off,
from `EngineConfig` / `LLM(...)` keywords and from the engine flags `loong-jax generate`, `serve` and `eval`
share."""

import argparse

import pytest

from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.entrypoints.cli import add_engine_arguments, engine_kwargs_from_args
from loong_jax.entrypoints.engine_config import EngineConfig


def test_engine_config_defaults_and_checks():
    config = EngineConfig()
    assert config.prefix_caching and config.prefix_cache_fraction == 1.0
    with pytest.raises(ValueError, match="prefix_cache_fraction"):
        EngineConfig(prefix_cache_fraction=1.5)
    assert PrefixCacheOptions(max_fraction=0.25).capacity(100) == 25
    assert PrefixCacheOptions(enabled=False).capacity(100) == 0


def _kwargs(*flags):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_kwargs_from_args(parser.parse_args(list(flags)))


def test_engine_flags_size_or_disable_the_cache():
    assert _kwargs()["prefix_caching"] and _kwargs()["prefix_cache_fraction"] == 1.0
    assert not _kwargs("--no-prefix-cache")["prefix_caching"]
    assert _kwargs("--prefix-cache-fraction", "0.3")["prefix_cache_fraction"] == 0.3
    EngineConfig(**{k: v for k, v in _kwargs("--prefix-cache-fraction", "0.3").items() if k != "cpu_devices"})
