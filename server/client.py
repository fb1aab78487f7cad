"""Python clients of the loong_jax gRPC service: `LoongClient` (blocking) and `AsyncLoongClient` (asyncio).

Data flow:
  1. The client opens one channel (plaintext, TLS or mutual TLS) and attaches the API key, when it
     has one, as `authorization: Bearer <key>` metadata on every call.
  2. `generate(prompt, max_tokens=..., temperature=...)` sends one `GenerateRequest` (the prompt's
     type picks text, token ids or chat messages) and returns a stream object: iterating it yields
     `Delta`s (new token ids, text, logprobs); when the iteration ends `stream.completion` holds the
     whole answer (`text`, `token_ids`, `finish_reason`, usage, timings). `stream.cancel()` cancels
     the call, which aborts the request on the server and frees its pages.
  3. `complete(...)` is generate + fold in one call; `abort`, `tokenize`, `detokenize`,
     `model_info`, `server_info` and `health` are plain unary calls.
  4. Errors arrive as `grpc.RpcError` (sync) / `grpc.aio.AioRpcError` (async) with the server's code.
  5. `loong-jax client` (`client_main`) waits for readiness when asked (`--wait-ready`), and tells "no
     server at HOST:PORT: connection refused" apart from a server that is still warming up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.generated import generation_pb2_grpc as pb_grpc
from loong_jax.server.tls import client_channel_credentials
from loong_jax.server.wire import (Completion, CompletionBuilder, Delta, chat_messages_to_proto,
                                   prompt_to_request, sampling_to_proto)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "loong_jax.v1.Generation"
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def _channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes), *extra]


def _credentials(root_ca, client_cert, client_key, tls: bool) -> grpc.ChannelCredentials | None:
    if not (tls or root_ca is not None or client_cert is not None):
        return None
    return client_channel_credentials(root_ca, client_cert, client_key)


def _tokenize_request(text_or_messages: str | Sequence[Mapping[str, str]],
                      add_special_tokens: bool | None) -> pb.TokenizeRequest:
    request = pb.TokenizeRequest()
    if isinstance(text_or_messages, str):
        request.text = text_or_messages
    else:
        request.messages.CopyFrom(chat_messages_to_proto(text_or_messages))
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _detokenize_request(token_ids: Sequence[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    request = pb.DetokenizeRequest(token_ids=list(token_ids))
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    return request


def _generate_request(prompt: Prompt, request_id: str | None, sampling: Mapping[str, Any] | None,
                      sampling_kwargs: Mapping[str, Any]) -> pb.GenerateRequest:
    values = {**(sampling or {}), **sampling_kwargs}
    return prompt_to_request(prompt, sampling=sampling_to_proto(values), request_id=request_id)


class _ClientBase:
    """The channel, stubs and call metadata both clients share; `_channels` is grpc or grpc.aio."""

    _channels: Any

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls: bool = False,
                 root_ca: bytes | str | Path | None = None, client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, options: Sequence[tuple[str, Any]] = ()):
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        credentials = _credentials(root_ca, client_cert, client_key, tls)
        channel_options = _channel_options(max_message_bytes, options)
        self.channel = (self._channels.secure_channel(target, credentials, options=channel_options) if credentials
                        else self._channels.insecure_channel(target, options=channel_options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _call_metadata(self, extra: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
        return self._metadata + tuple(extra or ())


class _StreamBase:
    """What both streams know once their first chunks arrived (the request id, the prompt length) and, at the
    end, the whole answer."""

    def __init__(self, call):
        self._call = call
        self._builder = CompletionBuilder()

    @property
    def request_id(self) -> str | None:
        return self._builder.request_id

    @property
    def prompt_tokens(self) -> int | None:
        return self._builder.prompt_tokens

    @property
    def completion(self) -> Completion | None:
        return self._builder.completion


# ====================================================================== blocking client
class GenerateStream(_StreamBase):
    """Iterate for `Delta`s; afterwards `completion` holds the whole answer."""

    def __iter__(self) -> Iterator[Delta]:
        for message in self._call:
            delta = self._builder.feed(message)
            if delta is not None:
                yield delta

    def cancel(self) -> None:
        self._call.cancel()


class LoongClient(_ClientBase):
    """Blocking client. `tls=True` or a `root_ca` switches to TLS; `client_cert` + `client_key` to mTLS."""

    _channels = grpc  # blocking channels

    def generate(self, prompt: Prompt, *, request_id: str | None = None, timeout: float | None = None,
                 sampling: Mapping[str, Any] | None = None, metadata=None, **sampling_kwargs) -> GenerateStream:
        request = _generate_request(prompt, request_id, sampling, sampling_kwargs)
        return GenerateStream(self.stub.Generate(request, timeout=timeout,
                                                 metadata=self._call_metadata(metadata)))

    def complete(self, prompt: Prompt, **kwargs) -> Completion:
        stream = self.generate(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.completion

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        response = self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                                   metadata=self._metadata)
        return response.found

    def tokenize(self, text_or_messages: str | Sequence[Mapping[str, str]], *,
                 add_special_tokens: bool | None = None, timeout: float | None = None) -> list[int]:
        response = self.stub.Tokenize(_tokenize_request(text_or_messages, add_special_tokens), timeout=timeout,
                                      metadata=self._metadata)
        return list(response.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None,
                   timeout: float | None = None) -> str:
        response = self.stub.Detokenize(_detokenize_request(token_ids, skip_special_tokens), timeout=timeout,
                                        metadata=self._metadata)
        return response.text

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ...; service "" = live, SERVICE_NAME = ready."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "LoongClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ====================================================================== asyncio client
class AsyncGenerateStream(_StreamBase):
    """`async for` yields `Delta`s; afterwards `completion` holds the whole answer."""

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for message in self._call:
            delta = self._builder.feed(message)
            if delta is not None:
                yield delta

    def cancel(self) -> bool:
        return self._call.cancel()


class AsyncLoongClient(_ClientBase):
    """asyncio client; create and use it inside one running event loop."""

    _channels = grpc.aio  # asyncio channels

    def generate(self, prompt: Prompt, *, request_id: str | None = None, timeout: float | None = None,
                 sampling: Mapping[str, Any] | None = None, metadata=None,
                 **sampling_kwargs) -> AsyncGenerateStream:
        request = _generate_request(prompt, request_id, sampling, sampling_kwargs)
        return AsyncGenerateStream(self.stub.Generate(request, timeout=timeout,
                                                      metadata=self._call_metadata(metadata)))

    async def complete(self, prompt: Prompt, **kwargs) -> Completion:
        stream = self.generate(prompt, **kwargs)
        async for _ in stream:
            pass
        return stream.completion

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        response = await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                                         metadata=self._metadata)
        return response.found

    async def tokenize(self, text_or_messages: str | Sequence[Mapping[str, str]], *,
                       add_special_tokens: bool | None = None, timeout: float | None = None) -> list[int]:
        response = await self.stub.Tokenize(_tokenize_request(text_or_messages, add_special_tokens),
                                            timeout=timeout, metadata=self._metadata)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None,
                         timeout: float | None = None) -> str:
        response = await self.stub.Detokenize(_detokenize_request(token_ids, skip_special_tokens),
                                              timeout=timeout, metadata=self._metadata)
        return response.text

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout,
                                             metadata=self._metadata)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncLoongClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# ====================================================================== command line
def _connection_failure(details: str, target: str) -> str | None:
    """Why nothing answered, from an UNAVAILABLE status's details, or None when a server answered (it is
    still starting). gRPC ends them with the socket error: "failed to connect to all addresses; last error:
    UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"."""
    if "failed to connect" not in details.lower():
        return None
    reason = details.rsplit(":", 1)[-1].strip().lower() or "cannot connect"
    return f"no server at {target}: {reason}"


def client_main(argv: Sequence[str] | None = None, stdout=None) -> int:
    """`loong-jax client "prompt"`: stream one completion from a running server to stdout."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="loong-jax client", description="Send one request to a loong-jax server "
                                     "and stream the answer to stdout.")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="host:port of the server (default %(default)s)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tls-ca", default=None, help="CA of the server's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
    parser.add_argument("--wait-ready", type=float, default=0.0,
                        help="seconds to wait for the server to become ready (it may still be warming up)")
    args = parser.parse_args(argv)
    stdout = stdout or sys.stdout
    with LoongClient(args.target, api_key=args.api_key, root_ca=args.tls_ca, client_cert=args.tls_cert,
                     client_key=args.tls_key) as client:
        deadline = time.monotonic() + args.wait_ready
        while True:
            unreachable = None
            try:
                if client.health(SERVICE_NAME, timeout=5) == "SERVING":
                    break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # not "still starting": report it
                    print(f"loong-jax client: {error.code().name}: {error.details()}", file=sys.stderr)
                    return 1
                unreachable = _connection_failure(error.details() or "", args.target)
            if time.monotonic() >= deadline:
                print(f"loong-jax client: {unreachable or f'{args.target} is not ready'}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
        try:
            stream = client.generate(prompt, **sampling)
            for delta in stream:
                stdout.write(delta.text)
                stdout.flush()
        except grpc.RpcError as error:
            print(f"\nloong-jax client: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        stdout.write("\n")
        completion = stream.completion
        print(f"[{completion.finish_reason}; {completion.prompt_tokens} prompt + "
              f"{completion.usage.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(client_main())
