"""`loong-jax --help`, `serve --help` and `generate --help` answer without importing JAX or gRPC, list every
policy, and the server logs the engine's start-up summary when the engine is ready."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys

import pytest

from loong_jax.entrypoints.cli import add_engine_arguments, engine_kwargs_from_args
from loong_jax.scheduler.policy import policy_names
from loong_jax.server.engine_port import EnginePort

HELP_SCRIPT = """
import sys
from loong_jax.entrypoints.cli import main
for argv in (["--help"], ["serve", "--help"], ["generate", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = [name for name in ("jax", "grpc") if name in sys.modules]
print("heavy modules:", heavy)
"""


def test_help_imports_neither_jax_nor_grpc():
    wide = {**os.environ, "COLUMNS": "400"}  # argparse wraps help at hyphens otherwise ("chunked- prefill")
    completed = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120,
                               env=wide)
    assert completed.returncode == 0, completed.stderr
    assert "heavy modules: []" in completed.stdout, completed.stdout[-500:]
    serve_help = completed.stdout.split("usage: loong-jax serve")[1].split("usage: loong-jax generate")[0]
    assert "--cpu-devices N" in serve_help
    policy_help = " ".join(serve_help.split("\n  --policy POLICY[:KEY=VALUE...]")[1].split("\n  --prefill-degree")[0]
                           .split())
    assert policy_help.startswith("scheduling policy: " + ", ".join(policy_names()))
    assert "chunked-prefill" in policy_help


def test_engine_port_logs_the_startup_summary(engine, caplog):
    port = EnginePort(lambda: engine, owns_engine=False)
    with caplog.at_level(logging.INFO, logger="loong_jax.server.engine_port"):
        asyncio.run(port.load())
    (record,) = [r for r in caplog.records if r.getMessage().startswith("engine: model ")]
    message = record.getMessage()
    assert "cpu: 2 of 8 devices | 2 instances x tp 1 | policy esp" in message
    assert "KV 256 pages x 16 tokens per instance" in message and "compilation cache" in message
    assert record.fields["instances"] == 2 and record.fields["event"] == "engine_loaded"


def test_policy_options_on_the_command_line(capsys):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    kwargs = engine_kwargs_from_args(parser.parse_args(["--policy", "replicas:queue=deadline:admission=on"]))
    assert kwargs["policy"] == "replicas" and kwargs["policy_options"] == {"queue": "deadline", "admission": "on"}
    assert engine_kwargs_from_args(parser.parse_args([]))["policy_options"] is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "nope:queue=fifo"])
    assert "unknown policy 'nope'" in capsys.readouterr().err
