"""Simulated CPU devices (`LLM(cpu_devices=N)`, `--cpu-devices N`) and the start-up summary (`LLM.describe()`,
printed by `loong-jax generate`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from loong_jax.entrypoints.cpu_devices import use_cpu_devices
from loong_jax.entrypoints.llm import LLM, format_description


def test_cpu_devices_must_be_set_before_jax_starts(checkpoint_dir):
    assert len(jax.devices()) == 8  # the test session started JAX with 8 CPU devices (conftest)
    use_cpu_devices(8)  # what JAX already has: nothing to do
    use_cpu_devices(None)
    with pytest.raises(ValueError, match=r"cpu_devices=3: JAX already started with 8 cpu device\(s\)"):
        LLM(checkpoint_dir, cpu_devices=3, warmup=False, progress=False)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            use_cpu_devices(bad)


def test_describe_names_the_setup_in_force(shared_llm, checkpoint_dir):
    description = shared_llm.describe()
    assert description == {
        "model": str(checkpoint_dir), "platform": "cpu", "devices": 8, "local_devices": 8, "instances": 8,
        "tp": 1, "policy": shared_llm.engine.policy.name, "kv_pages_per_instance": 160, "page_size": 4,
        "cost_model": "none", "cost_model_provenance": "projected",
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir}  # the first engine's folder is in force
    line = format_description(description)
    assert "cpu: 8 of 8 devices | 8 instances x tp 1" in line
    assert "KV 160 pages x 4 tokens per instance" in line and "cost model none (roofline" in line


def test_generate_runs_on_simulated_cpu_devices_and_says_so(checkpoint_dir, compile_cache_dir):
    # A fresh process: --cpu-devices takes effect before JAX starts, and the summary on stderr shows it.
    command = [sys.executable, "-m", "loong_jax.entrypoints.cli", "generate", "--cpu-devices", "2", "--model", str(checkpoint_dir),
               "--no-warmup", "--stats", "--max-tokens", "2", "--page-size", "4", "--kv-pages", "32",
               "--compilation-cache-dir", str(compile_cache_dir), "The quick brown fox"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "loong-jax generate: model " in completed.stderr
    assert "cpu: 2 of 2 devices | 2 instances x tp 1 | policy esp" in completed.stderr, completed.stderr[-2000:]
    assert completed.stdout.strip()
    report = re.search(r"^\{$", completed.stderr, re.M)  # --stats: the engine's counters, last on stderr
    stats = json.loads(completed.stderr[report.start():])
    assert sum(stats["prefill_batches_by_degree"].values()) == 1 and stats["units_prefill"] == 1
