"""Starting a test cluster: N processes of one script on loopback, each told its process id and the free
coordinator port; their logs are kept for a failing test's message. `served_cluster` starts
`loong-jax serve` as a leader (flags) and a follower (LOONG_JAX_* environment variables) and yields
once the leader announced its gRPC port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(module_args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m <module_args...>` from the repository root, stdout and stderr into `log`."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as output:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO_ROOT, env=environment,
                                stdout=output, stderr=subprocess.STDOUT)


def start_processes(module_args: list[str], num_processes: int, logs: Path,
                    per_process_args=lambda process_id: []) -> list[subprocess.Popen]:
    """One process per id, each with its own arguments appended, logs in logs/process<id>.log."""
    return [start_process([*module_args, *per_process_args(process_id)], logs / f"process{process_id}.log")
            for process_id in range(num_processes)]


def wait_all(processes: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes; a process still running after `timeout_s` is killed (and reads as -9)."""
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    other.kill()
            codes.append(process.wait())
    return codes


def tail(logs: Path, lines: int = 40) -> str:
    """The end of every process's log (noise of the collectives' transport left out)."""
    parts = []
    for log in sorted(logs.glob("process*.log")):
        kept = [line for line in log.read_text(errors="replace").splitlines() if "[Gloo]" not in line]
        parts.append(f"--- {log.name}\n" + "\n".join(kept[-lines:]))
    return "\n".join(parts)


def serve_args(checkpoint_dir, cache_dir, *extra: str) -> list[str]:
    """`loong-jax serve` on 4 simulated CPU devices per process, every group over both processes."""
    from tests.engine_fixtures import KV_PAGES, PAGE_SIZE

    return ["loong_jax.entrypoints.cli", "serve", "--model", str(checkpoint_dir), "--cpu-devices", "4",
            "--page-size", str(PAGE_SIZE), "--kv-pages", str(KV_PAGES), "--policy", "fixed", "--prefill-degree", "8",
            "--decode-degree", "8", "--no-warmup", "--compilation-cache-dir", str(cache_dir), "--host", "127.0.0.1",
            "--port", "0", *extra]


def announced_target(log: Path, process: subprocess.Popen, timeout_s: float) -> str:
    """The HOST:PORT the leader printed once it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("loong-jax serving on "):
                return line.split()[-1]
        assert process.poll() is None, f"the leader exited early with {process.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"the leader did not announce its port within {timeout_s} s")


@contextlib.contextmanager
def served_cluster(args: list[str], logs: Path, start_timeout_s: float = 240):
    """(leader, follower, target); whatever is still running at the end is killed."""
    coordinator = f"127.0.0.1:{free_port()}"
    leader = start_process(args + ["--coordinator", coordinator, "--num-processes", "2", "--process-id", "0"],
                           logs / "process0.log")
    follower = start_process(args, logs / "process1.log", env={
        "LOONG_JAX_COORDINATOR": coordinator, "LOONG_JAX_NUM_PROCESSES": "2", "LOONG_JAX_PROCESS_ID": "1"})
    try:
        yield leader, follower, announced_target(logs / "process0.log", leader, start_timeout_s)
    finally:
        for process in (leader, follower):
            if process.poll() is None:
                process.kill()
                process.wait()
