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
  4. Several processes (`--coordinator HOST:PORT --num-processes N --process-id I`, or the environment's
     LOONG_JAX_COORDINATOR / LOONG_JAX_NUM_PROCESSES / LOONG_JAX_PROCESS_ID; the flags win): process 0
     serves as above (its engine leads the cluster); every other process binds nothing and runs
     `loong_jax.distributed.follower.run_follower` with the same engine flags until the leader stops
     (exit 0). The three values are checked with the other flags, before anything loads.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from loong_jax.distributed.launch import cluster_options, from_env
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
    cluster = parser.add_argument_group("several processes (one command per process; JAX's multi-controller "
                                        "runtime)")
    cluster.add_argument("--coordinator", default=None,
                         help="HOST:PORT where process 0 runs JAX's coordination service (env LOONG_JAX_COORDINATOR)")
    cluster.add_argument("--num-processes", type=int, default=None,
                         help="processes in the cluster (env LOONG_JAX_NUM_PROCESSES)")
    cluster.add_argument("--process-id", type=int, default=None,
                         help="this process, 0 = the leader that serves (env LOONG_JAX_PROCESS_ID)")
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


def cluster_kwargs_from_args(args: argparse.Namespace) -> dict:
    """The launch values (flags over environment), checked; {} for a single process."""
    values = {**from_env(), **{name: getattr(args, name) for name in ("coordinator", "num_processes", "process_id")
                               if getattr(args, name) is not None}}
    options = cluster_options(values.get("coordinator"), values.get("num_processes"), values.get("process_id"))
    if options is None:
        return {}
    return {"coordinator": options.coordinator, "num_processes": options.num_processes,
            "process_id": options.process_id}


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
        engine_kwargs = {**engine_kwargs_from_args(args), **cluster_kwargs_from_args(args)}
        if engine_kwargs.get("process_id", 0) != 0:
            return _follow(engine_kwargs)
        from loong_jax.server.engine_port import EnginePort  # imports JAX: only once the flags are good

        engine = EnginePort.create(**engine_kwargs)
    except (ValueError, FileNotFoundError) as err:
        print(f"loong-jax serve: error: {err}", file=sys.stderr)
        return 2
    from loong_jax.server.app import ListenError

    try:
        code = asyncio.run(_serve(engine, options))
    except ListenError as err:  # a taken port: one line, not a traceback
        print(f"loong-jax serve: error: {err}", file=sys.stderr)
        return 1
    if code != 0 and "coordinator" in engine_kwargs:
        # A lost process: a thread may be stuck in a collective with it, and JAX's exit barrier would wait
        # for it too; the logs are flushed and the process ends now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _follow(engine_kwargs: dict) -> NoReturn:
    """A follower: no server; the leader's steps until it stops, then the process ends (exit code 0)."""
    from loong_jax.distributed.follower import run_follower
    from loong_jax.distributed.launch import leave_cluster
    from loong_jax.entrypoints.engine_config import EngineConfig

    config = EngineConfig(**{**engine_kwargs, "progress": False})
    logger.info("process %d follows the leader at %s", config.process_id, config.coordinator)
    run_follower(config)
    leave_cluster(0)  # the leader (and its coordination service) may be gone already: no exit handshake


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loong-jax serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(serve_main())
