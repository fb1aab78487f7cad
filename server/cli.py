"""`loong-jax serve`: start the gRPC server on a model (the shipped demo model by default).

Data flow:
  1. `serve_main(argv)` (what `loong-jax serve` delegates to) parses the engine flags shared with
     `loong-jax generate` plus the server's own.
  2. `options_from_args` checks the flags that need no engine (API keys, TLS files, limits) first,
     so a typo fails in a second, before the model loads and compiles (exit code 2). Parsing (and
     `--help`) imports neither gRPC nor JAX: the server modules are imported once the flags parsed.
  3. The server binds and starts answering health checks (NOT_SERVING) while an `EnginePort` builds
     the `AsyncLLM` (weights, KV pools, warm-up compilation) in a worker thread; then it is ready.
     `EnginePort.load` logs the start-up summary (`LLM.describe()`: model, devices, instances x tp,
     policy, KV pages, cost-model file, compile cache) when the engine is ready.
     `serve_until_signal` serves until SIGTERM / SIGINT, drains, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from loong_jax.entrypoints.cli import add_engine_arguments, engine_kwargs_from_args
from loong_jax.server.logging_setup import LOG_FORMATS, configure_logging  # the standard library only

logger = logging.getLogger("loong_jax.server.cli")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_engine_arguments(parser)  # the same engine flags as `loong-jax generate`
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default %(default)s: loopback only; 0.0.0.0 exposes the server)")
    net.add_argument("--port", type=int, default=50051, help="port (default %(default)s; 0 = any free port)")
    net.add_argument("--max-message-bytes", type=int, default=None,
                     help="largest request or response message (default: the server's, 16 MiB)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-queued-requests", type=int, default=0,
                        help="requests accepted but not yet streaming; more get RESOURCE_EXHAUSTED (0 = no limit)")
    limits.add_argument("--max-queued-tokens", type=int, default=0,
                        help="prompt tokens of those requests (0 = no limit)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted (default: the context length - 1)")
    limits.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds open requests get to finish after SIGTERM / SIGINT")
    limits.add_argument("--write-timeout", type=float, default=None,
                        help="seconds a client may leave a response unread before its request is aborted and "
                             "its KV freed (default: the server's, 30 s)")
    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", default=None,
                          help="accepted API key (repeatable); clients send 'authorization: Bearer <key>'")
    security.add_argument("--api-key-file", default=None, help="file with one API key per line")
    security.add_argument("--tls-cert", default=None, help="server certificate chain (PEM)")
    security.add_argument("--tls-key", default=None, help="server private key (PEM)")
    security.add_argument("--tls-client-ca", default=None,
                          help="CA for client certificates: turns on mutual TLS (clients must present one)")
    ops = parser.add_argument_group("observability")
    ops.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    ops.add_argument("--metrics-host", default=None, help="address of the metrics endpoint (default: --host)")
    ops.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text or JSON lines")
    ops.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def options_from_args(args: argparse.Namespace):
    """Every flag that needs no engine, checked (a `ServerOptions`); ValueError names the flag."""
    from loong_jax.server.app import ServerOptions
    from loong_jax.server.auth import load_api_keys
    from loong_jax.server.tls import TlsConfig

    return ServerOptions(
        host=args.host, port=args.port, max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens, max_prompt_tokens=args.max_prompt_tokens,
        drain_timeout=args.drain_timeout,
        api_keys=load_api_keys(args.api_key, args.api_key_file),
        tls=TlsConfig.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca),
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        **{flag: value for flag, value in (("max_message_bytes", args.max_message_bytes),
                                           ("write_timeout", args.write_timeout)) if value is not None})


def _announce(server) -> None:
    # One plain line on stdout: scripts (and the drain test) read the bound port from it.
    print(f"loong-jax serving on {server.options.host}:{server.port}", flush=True)


async def _serve(engine, options) -> int:
    from loong_jax.server.app import GenerationServer, serve_until_signal

    try:
        return await serve_until_signal(GenerationServer(engine, options), on_started=_announce)
    finally:
        await engine.close()


def run_serve(args: argparse.Namespace) -> int:
    try:
        configure_logging(args.log_format, args.log_level.upper())
        options = options_from_args(args)
        from loong_jax.server.engine_port import EnginePort  # imports JAX: only once the flags are good

        engine = EnginePort.create(**engine_kwargs_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"loong-jax serve: error: {err}", file=sys.stderr)
        return 2
    from loong_jax.server.app import ListenError

    try:
        return asyncio.run(_serve(engine, options))
    except ListenError as err:  # a taken port: one line, not a traceback
        print(f"loong-jax serve: error: {err}", file=sys.stderr)
        return 1


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loong-jax serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(serve_main())
