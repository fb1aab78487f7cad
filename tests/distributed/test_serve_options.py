"""`loong-jax serve`'s multi-process options: bad values (from flags or from the LOONG_JAX_* environment)
end the command with exit code 2 and a line naming the problem, before any model loads; flags win over
the environment."""

from __future__ import annotations

import argparse

import pytest

from loong_jax.server.cli import add_serve_arguments, cluster_kwargs_from_args, serve_main


def parse(argv):
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("argv,env,message", [
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], {}, "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], {}, "process_id must be"),
    (["--coordinator", "h:1"], {}, "missing: num_processes, process_id"),
    ([], {"LOONG_JAX_COORDINATOR": "h:1", "LOONG_JAX_NUM_PROCESSES": "two", "LOONG_JAX_PROCESS_ID": "0"},
     "LOONG_JAX_NUM_PROCESSES must be an integer"),
])
def test_bad_cluster_values_exit_2_before_loading(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve_main(["--model", "/no/such/checkpoint", *argv]) == 2
    assert message in capsys.readouterr().err


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("LOONG_JAX_COORDINATOR", "env:1")
    monkeypatch.setenv("LOONG_JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("LOONG_JAX_PROCESS_ID", "3")
    assert cluster_kwargs_from_args(parse(["--process-id", "1"])) == {
        "coordinator": "env:1", "num_processes": 4, "process_id": 1}
    monkeypatch.delenv("LOONG_JAX_COORDINATOR")
    monkeypatch.delenv("LOONG_JAX_NUM_PROCESSES")
    monkeypatch.delenv("LOONG_JAX_PROCESS_ID")
    assert cluster_kwargs_from_args(parse([])) == {}
