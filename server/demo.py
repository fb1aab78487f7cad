"""`loong-jax demo`: the quick start's main job in one command.

Data flow:
  1. Pick a free loopback port and start `loong-jax serve` on it as a child
     process (demo model unless `--model` is given; extra flags after `--` go
     to the server).
  2. `loong-jax client` waits until the service reports ready (warm-up done),
     sends one request and streams the answer to stdout.
  3. SIGTERM the server: it drains and exits 0. The demo's exit status is the
     client's, or the server's if the client succeeded and the server did not.
"""

from __future__ import annotations

import argparse
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
    server = subprocess.Popen(command)
    try:
        client_status = client_main([args.prompt, "--target", f"127.0.0.1:{port}",
                                     "--max-tokens", str(args.max_tokens),
                                     "--wait-ready", str(args.ready_timeout)])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server_status = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server_status = server.wait()
    return client_status or server_status


if __name__ == "__main__":
    sys.exit(demo_main())
