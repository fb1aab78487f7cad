"""API-key authentication for the gRPC server, checked in constant time on every RPC but health.

Data flow:
  1. `load_api_keys(keys, key_file)` gathers the keys given with `--api-key` (repeatable) and the
     lines of `--api-key-file` (blank lines and `#` comments ignored) into an `ApiKeySet`.
  2. A client sends its key as `authorization: Bearer <key>` (or `x-api-key: <key>`) metadata.
  3. `ApiKeyInterceptor` runs before every handler: health checks pass untouched (load balancers probe
     without secrets); any other call whose key does not match is answered UNAUTHENTICATED before the
     servicer sees it.
  4. Matching hashes both sides with SHA-256 and compares every configured key with
     `hmac.compare_digest`, never stopping early, so the time taken says nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Iterable, Sequence

import grpc

AUTHORIZATION_HEADER = "authorization"
API_KEY_HEADER = "x-api-key"
BEARER_PREFIX = "bearer "
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def _digest(key: str) -> bytes:
    # Equal-length digests make compare_digest's time independent of the key's length as well.
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeySet:
    """The accepted keys, stored only as digests."""

    def __init__(self, keys: Iterable[str]):
        digests = []
        for index, key in enumerate(keys):
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"api key #{index + 1} is empty")
            if key != key.strip():
                raise ValueError(f"api key #{index + 1} has leading or trailing whitespace")
            digests.append(_digest(key))
        if not digests:
            raise ValueError("an ApiKeySet needs at least one key")
        self._digests = tuple(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, presented: str | None) -> bool:
        if presented is None:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def load_api_keys(keys: Sequence[str] | None = None, key_file: str | Path | None = None) -> ApiKeySet | None:
    """Keys from the command line and a key file; None when neither gives any (auth off)."""
    collected = list(keys or [])
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-key-file {path}: {err.strerror or err}") from None
        collected += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not collected:
            raise ValueError(f"--api-key-file {path} holds no key")
    return ApiKeySet(collected) if collected else None


def presented_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key a call carries: `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for name, value in metadata or ():
        if isinstance(value, bytes):  # binary headers (-bin) never carry a key
            continue
        name = name.lower()
        if name == AUTHORIZATION_HEADER and value[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return value[len(BEARER_PREFIX):].strip()
        if name == API_KEY_HEADER:
            return value.strip()
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""

    async def reject_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def reject_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers must be

    serializers = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject_stream, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject_unary, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **serializers)
    return grpc.unary_unary_rpc_method_handler(reject_unary, **serializers)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call but health that does not carry one of the keys."""

    def __init__(self, keys: ApiKeySet, on_reject=None):
        self._keys = keys
        self._on_reject = on_reject  # called with the method name, for metrics

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        key = presented_key(handler_call_details.invocation_metadata)
        if self._keys.matches(key):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        reason = "missing API key" if key is None else "wrong API key"
        return _rejecting_handler(handler, f"{reason}: send 'authorization: Bearer <key>' metadata")
