"""Server assembly: a grpc.aio server around one engine, with health, reflection, auth, TLS, metrics, drain.

Data flow:
  1. `GenerationServer(engine_port, options)`; `await start()` first checks that `host:port` and the
     metrics port can be listened on (a taken one is a `ListenError` naming it: one line, no
     traceback), builds the grpc.aio server (message-size limits; the API-key interceptor when keys
     are given), registers the Generation servicer, the standard health service and reflection, binds
     `host:port` (TLS when configured; port 0 picks a free one), starts the Prometheus endpoint, and
     starts two watchers:
       - warm-up: the port loads the engine (weights, KV pools, ahead-of-time compilation) in a
         worker thread; health of "loong_jax.v1.Generation" turns SERVING when that is done
         ("" = liveness is SERVING from the start; calls before then get UNAVAILABLE);
       - death: if the engine loop dies, every health status turns NOT_SERVING and every open
         Generate ends with INTERNAL (the servicer waits on the same event); over several processes
         (a lost process: `EnginePort.death_is_unavailable`) with UNAVAILABLE.
  2. `await drain(timeout)`: health NOT_SERVING, new calls UNAVAILABLE, open requests run to the end;
     at the deadline, or at a second signal, the rest are aborted (their calls end UNAVAILABLE).
  3. `await stop()`: the gRPC server and the metrics endpoint close.
  4. `serve_until_signal(server)` is what `loong-jax serve` runs: start, wait for SIGTERM / SIGINT,
     drain (a second signal ends the wait early), stop, return exit code 0. If the engine dies while
     serving, the server stays up answering NOT_SERVING for `drain_timeout` seconds (so probes see
     it), then exits with code 1; if it fails to load, the exit is immediate (code 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loong_jax.server.auth import ApiKeyInterceptor, ApiKeySet
from loong_jax.server.engine_port import EnginePort
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.metrics import ServerMetrics
from loong_jax.server.servicer import GenerationServicer, ServingLimits, ServingState
from loong_jax.server.tls import TlsConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "loong_jax.v1.Generation"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_WRITE_TIMEOUT_S = 30.0
ENGINE_POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate choice
    port: int = 50051
    max_queued_requests: int = 0  # 0 = unlimited
    max_queued_tokens: int = 0  # 0 = unlimited
    max_prompt_tokens: int | None = None  # None = the model's context length - 1
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout: float = 30.0
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_S  # a client that takes no response for this long loses its call
    api_keys: ApiKeySet | None = None
    tls: TlsConfig | None = None
    metrics_port: int | None = None  # None = no endpoint; 0 = any free port
    metrics_host: str | None = None  # None = same as host

    def __post_init__(self):
        for field in ("max_queued_requests", "max_queued_tokens"):
            if getattr(self, field) < 0:
                raise ValueError(f"--{field.replace('_', '-')} must be >= 0 (0 = unlimited)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("--max-prompt-tokens must be >= 1")
        if self.max_message_bytes < 1024:
            raise ValueError("--max-message-bytes must be >= 1024")
        if self.drain_timeout < 0:
            raise ValueError("--drain-timeout must be >= 0 seconds")
        if not self.write_timeout > 0:
            raise ValueError("--write-timeout must be > 0 seconds")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")


def _lenient_deserializer(message_class):
    """Parses a request; a malformed one becomes a `_Malformed` value the handler answers with
    INVALID_ARGUMENT (gRPC itself would answer INTERNAL for a deserializer that raises)."""

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return _Malformed(f"request is not a valid {message_class.DESCRIPTOR.full_name}: {err}")

    return deserialize


@dataclasses.dataclass(frozen=True)
class _Malformed:
    message: str


def _guard_unary(method, metrics: ServerMetrics):
    async def handle(request, context):
        if isinstance(request, _Malformed):
            metrics.observe_rejected(grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def _guard_stream(method, metrics: ServerMetrics):
    """A server-streaming method writes with `context.write` (a coroutine, not an async generator), so that
    each write can have a deadline."""

    async def handle(request, context):
        if isinstance(request, _Malformed):
            metrics.observe_rejected(grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        await method(request, context)

    return handle


def generation_handler(servicer: GenerationServicer, metrics: ServerMetrics) -> grpc.GenericRpcHandler:
    """The Generation service's handlers, built from the proto's descriptor, with lenient parsing."""
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        kwargs = dict(request_deserializer=_lenient_deserializer(request_class),
                      response_serializer=response_class.SerializeToString)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(implementation, metrics), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(implementation, metrics), **kwargs)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class GenerationServer:
    def __init__(self, engine: EnginePort, options: ServerOptions = ServerOptions()):
        self.engine = engine
        self.options = options
        self.limits = ServingLimits(max_prompt_tokens=options.max_prompt_tokens,
                                    max_queued_requests=options.max_queued_requests,
                                    max_queued_tokens=options.max_queued_tokens,
                                    write_timeout_s=options.write_timeout)
        self.metrics = ServerMetrics(engine.metrics_snapshot)
        self.state: ServingState | None = None
        self.servicer: GenerationServicer | None = None
        self.health = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watchers: list[asyncio.Task] = []
        self._stopped = False
        self.was_ready = False

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> int:
        """Binds and starts serving; returns the bound port. A port that is taken raises `ListenError`."""
        options = self.options
        metrics_host = options.metrics_host or options.host
        check_can_listen(options.host, options.port)  # grpc's own failure is a C-core log line, no reason
        if options.metrics_port is not None:
            check_can_listen(metrics_host, options.metrics_port, " (metrics)")
        self.state = ServingState()  # its asyncio.Event belongs to the running loop
        self.servicer = GenerationServicer(self.engine, self.limits, self.metrics, self.state)
        interceptors = []
        if options.api_keys is not None:
            interceptors.append(ApiKeyInterceptor(options.api_keys,
                                                  on_reject=lambda _method: self.metrics.observe_rejected(
                                                      grpc.StatusCode.UNAUTHENTICATED.name)))
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
        ])
        server.add_generic_rpc_handlers([generation_handler(self.servicer, self.metrics)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, NOT_SERVING)  # until warm-up is done
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{_bracketed(options.host)}:{options.port}"
        try:
            if options.tls is not None:
                port = server.add_secure_port(address, options.tls.server_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # "Failed to bind": taken between the check and now
            port = 0
        if port == 0:
            raise ListenError(f"cannot listen on {address}: address already in use or not of this machine")
        if options.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(metrics_host, options.metrics_port)
            except OSError as err:  # taken between the check and now
                await server.stop(None)
                raise ListenError(f"cannot listen on {_bracketed(metrics_host)}:{options.metrics_port} (metrics): "
                                  f"{_reason(err)}") from None
        await server.start()
        self._server, self.port = server, port
        self._watchers = [asyncio.create_task(self._watch_warm_up(), name="loong-jax-warm-up-watch"),
                          asyncio.create_task(self._watch_engine_death(), name="loong-jax-death-watch")]
        logger.info("serving %s on %s:%d (%s)", SERVICE_NAME, options.host, port,
                    "mutual TLS" if options.tls and options.tls.mutual else "TLS" if options.tls else "plaintext",
                    extra={"fields": {"event": "started", "host": options.host, "port": port,
                                      "metrics_port": self.metrics_port}})
        return port

    async def _watch_warm_up(self) -> None:
        await self.engine.wait_ready()
        if self.engine.is_ready():  # a walk over the vocabulary, done once, off the event loop
            await asyncio.to_thread(lambda: self.engine.longest_token_bytes)
        self.was_ready = True
        if not self.state.draining and self.state.dead_reason is None:
            await self.health.set(SERVICE_NAME, SERVING)
            logger.info("warm-up done: ready", extra={"fields": {"event": "ready"}})

    async def _watch_engine_death(self) -> None:
        reason = await self.engine.wait_dead()
        self.state.dead_reason = reason
        self.state.engine_dead.set()  # every open Generate ends with INTERNAL
        await self.health.enter_graceful_shutdown()  # liveness too: a supervisor should restart us
        logger.error("engine unavailable: %s", reason, extra={"fields": {"event": "engine_dead", "reason": reason}})

    async def drain(self, timeout: float | None = None, hurry: asyncio.Event | None = None) -> bool:
        """Stops taking requests and waits for open ones; True when all finished within the timeout.
        Setting `hurry` (a second SIGINT / SIGTERM) cuts the wait short."""
        timeout = self.options.drain_timeout if timeout is None else timeout
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        open_at_start = self.servicer.open_requests
        logger.info("draining: %d open requests, %.1f s", open_at_start, timeout,
                    extra={"fields": {"event": "draining", "open_requests": open_at_start}})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.servicer.open_requests and loop.time() < deadline and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.05)
        drained = self.servicer.open_requests == 0
        if not drained:
            open_requests = self.servicer.open_requests
            if hurry is not None and hurry.is_set():  # not a timeout: the operator asked twice
                logger.warning("second signal: aborting %d open requests", open_requests,
                               extra={"fields": {"event": "drain_interrupted", "aborted": open_requests}})
            else:
                logger.warning("drain timeout: aborting %d open requests", open_requests,
                               extra={"fields": {"event": "drain_timeout", "aborted": open_requests}})
            await self.servicer.abort_all_for_shutdown()
            grace_deadline = loop.time() + 5.0  # aborted requests end within a step or two
            while self.servicer.open_requests and loop.time() < grace_deadline:
                await asyncio.sleep(0.05)
        return drained

    async def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)
        self.metrics.stop_http()
        if self._server is not None:  # a server that never listened has nothing to report
            logger.info("stopped", extra={"fields": {"event": "stopped"}})


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ListenError(OSError):
    """A port this server cannot listen on; the message names the address and why, in one line."""


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def check_can_listen(host: str, port: int, what: str = "") -> None:
    """Raises ListenError when (host, port) cannot be bound (taken, or an address not of this machine)."""
    if port == 0:  # any free port
        return
    shown = f"{_bracketed(host)}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as err:  # socket.gaierror included
        raise ListenError(f"cannot listen on {shown}{what}: {_reason(err)}") from None


async def serve_until_signal(server: GenerationServer, on_started=None) -> int:
    """Start, wait for SIGTERM or SIGINT (or the engine's death), drain, stop. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop_requested, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # the first signal drains; a second one stops waiting for open requests
        (hurry if stop_requested.is_set() else stop_requested).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await server.start()
        if on_started is not None:
            on_started(server)
        dead = asyncio.create_task(server.state.engine_dead.wait())
        signalled = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({dead, signalled}, return_when=asyncio.FIRST_COMPLETED)
        dead.cancel()
        try:
            if server.state.dead_reason is not None and not stop_requested.is_set():
                if server.was_ready:  # died while serving: let probes see NOT_SERVING before exiting
                    await asyncio.wait({signalled}, timeout=server.options.drain_timeout)
                return 1
        finally:
            signalled.cancel()
        await server.drain(hurry=hurry)
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
