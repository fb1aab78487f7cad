"""`loong-jax demo`: the quick start's main job in one command.

Data flow:
  1. Pick a free loopback port and start `loong-jax serve` on it as a child
     process (demo model unless `--model` is given; extra flags after `--` go
     to the server).
  2. `loong-jax client` waits until the service reports ready (warm-up done),
     sends one request and collects the streamed answer.
  3. SIGTERM the server: it drains and exits 0. Only then is the answer
     printed, on its own lines after a header on stderr, so that no server
     log line can land in the middle of it (stdout holds the answer alone).
     The demo's exit status is the client's, or the server's if the client
     succeeded and the server did not.
"""

from __future__ import annotations

import argparse
import io
import signal
import socket
import subprocess
import sys
from typing import Sequence

from loong_jax.server.client import client_main

DEFAULT_PROMPT = "Return the number of"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loong-jax demo",
        description="Serve a model on loopback, answer one request over gRPC, shut down.",
        epilog="Flags after '--' are passed to `loong-jax serve`.")
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for the server's warm-up")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    serve_flags = argv[split + 1:]

    port = _free_loopback_port()
    command = [sys.executable, "-m", "loong_jax.server.cli", "--host", "127.0.0.1", "--port", str(port),
               *(["--model", args.model] if args.model else []), *serve_flags]
    print(f"loong-jax demo: starting the server on 127.0.0.1:{port}", file=sys.stderr)
    server = subprocess.Popen(command, stdout=sys.stderr)  # its "serving on" line joins its logs, not the answer
    answer = io.StringIO()
    try:
        client_status = client_main([args.prompt, "--target", f"127.0.0.1:{port}",
                                     "--max-tokens", str(args.max_tokens),
                                     "--wait-ready", str(args.ready_timeout)], stdout=answer)
    finally:
        server_status = _stop(server)
    if client_status == 0:
        _print_answer(args.prompt, answer.getvalue())
    return client_status or server_status


def _stop(server: subprocess.Popen) -> int:
    """SIGTERM, then wait for the drain (its logs end before the answer is shown)."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def _print_answer(prompt: str, answer: str) -> None:
    print(f"\nloong-jax demo: the model's completion of {prompt!r}:", file=sys.stderr, flush=True)
    sys.stdout.write(answer.rstrip("\n") + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(demo_main())
