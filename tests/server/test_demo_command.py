"""The README's main command, `loong-jax demo`: serve the demo model on loopback,
answer one request over gRPC, drain and exit 0."""

import subprocess
import sys


def test_demo_command_serves_and_answers_one_request():
    completed = subprocess.run(
        [sys.executable, "-m", "loong_jax.server.demo", "Return the number of", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    answer = completed.stdout.strip()
    assert len(answer) >= 8 and any(c.isalpha() for c in answer), completed.stdout
    assert "completion tokens]" in completed.stderr
    assert "stopped" in completed.stderr  # the server drained and exited on SIGTERM
    # The answer comes after every server log line, announced on a line of its own.
    header = completed.stderr.rstrip().splitlines()[-1]
    assert header == "loong-jax demo: the model's completion of 'Return the number of':", completed.stderr[-2000:]
    assert completed.stdout.endswith("\n") and not completed.stdout.endswith("\n\n")
    assert "serving on" not in completed.stdout and "serving on" in completed.stderr
