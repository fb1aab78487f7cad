"""Server lifecycle: health while loading / serving / draining, reflection, drain deadline, engine death."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2

from loong_jax.executor.protocol import PENDING_TOKEN
from loong_jax.server.app import GenerationServer, ServerOptions
from loong_jax.server.client import SERVICE_NAME, LoongClient
from loong_jax.server.engine_port import EnginePort
from tests.server.harness import start_server, status_code, wait_pages_free, wait_until

PROMPT = "Return the number of"


def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_drain(loop_thread, engine):
    release = threading.Event()

    def slow_loader():  # stands for loading weights and compiling: the server must not claim readiness
        assert release.wait(30)
        return engine

    # Started by hand: start_server() would wait for the readiness this test watches arrive.
    server = GenerationServer(EnginePort(slow_loader, owns_engine=False), ServerOptions(port=0))
    loop_thread.run(server.start())
    try:
        with LoongClient(f"127.0.0.1:{server.port}") as client:
            assert client.health("") == "SERVING"  # alive
            assert client.health(SERVICE_NAME) == "NOT_SERVING"  # not ready
            assert status_code(lambda: client.complete(PROMPT, max_tokens=1)) == grpc.StatusCode.UNAVAILABLE
            assert client.server_info().ready is False
            release.set()
            wait_until(lambda: client.health(SERVICE_NAME) == "SERVING", what="readiness after warm-up")
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
            assert client.server_info().ready is True
            assert loop_thread.run(server.drain(timeout=5)) is True
            assert client.health(SERVICE_NAME) == "NOT_SERVING" and client.health("") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                client.complete(PROMPT, max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            info = client.server_info()  # introspection still answers while draining
            assert info.draining and not info.ready
    finally:
        loop_thread.run(server.stop(grace=0.5))


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    file = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0])
    assert file.name == "loong_jax/v1/generation.proto" and file.package == "loong_jax.v1"
    (service,) = file.service
    assert [m.name for m in service.method] == ["Generate", "Abort", "Tokenize", "Detokenize", "GetModelInfo",
                                                "GetServerInfo"]
    assert service.method[0].server_streaming


def test_drain_deadline_aborts_what_is_left(loop_thread, engine_port):
    handle = start_server(loop_thread, engine_port)
    results: list = []
    try:
        with LoongClient(handle.target) as client:
            # long enough that none ends within the 0.3 s deadline below, however fast the machine
            streams = [client.generate(PROMPT, max_tokens=2000, temperature=0, ignore_eos=True) for _ in range(3)]
            iterators = [iter(stream) for stream in streams]
            for iterator in iterators:
                next(iterator)  # all three are running

            def finish(iterator):
                try:
                    for _ in iterator:
                        pass
                    results.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    results.append((error.code(), error.details()))

            threads = [threading.Thread(target=finish, args=(it,)) for it in iterators]
            for thread in threads:
                thread.start()
            assert loop_thread.run(handle.server.drain(timeout=0.3)) is False
            for thread in threads:
                thread.join(30)
    finally:
        handle.stop()
    assert len(results) == 3
    assert all(code == grpc.StatusCode.UNAVAILABLE and "drain" in details for code, details in results)
    wait_pages_free(engine_port)


def test_engine_death_ends_open_calls_with_internal_and_health_not_serving(loop_thread, model_dir):
    from loong_jax.entrypoints.async_llm import AsyncLLM

    doomed = AsyncLLM(model=str(model_dir), instances=1, kv_pages=256, progress=False)
    handle = start_server(loop_thread, EnginePort.wrap(doomed, model_dir))
    outcomes: list = []
    try:
        with LoongClient(handle.target) as client:
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
            engine = doomed.llm.engine
            healthy_step, doomed_after_next = engine.step, []

            def failing_step():  # a fault inside the engine loop, as a device error would raise
                if doomed_after_next:
                    healthy_step()
                    raise RuntimeError("injected device failure")
                outputs = healthy_step()
                started = [r for r in engine.state.requests.values()  # first token read (not still pending)
                           if r.generated and r.generated[0] != PENDING_TOKEN and not r.finish_reason]
                if len(started) >= 3:  # every stream has its first token: the next step dies (no timing race)
                    doomed_after_next.append(True)
                return outputs

            engine.step = failing_step
            streams = [client.generate(PROMPT, max_tokens=400, temperature=0, ignore_eos=True) for _ in range(3)]
            iterators = [iter(stream) for stream in streams]
            for iterator in iterators:
                next(iterator)
            for iterator in iterators:
                try:
                    for _ in iterator:
                        pass
                    outcomes.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as error:
                    outcomes.append((error.code(), error.details()))
            wait_until(lambda: client.health(SERVICE_NAME) == "NOT_SERVING", what="NOT_SERVING after death")
            assert client.health("") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                client.complete(PROMPT, max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "injected device failure" in err.value.details()
    finally:
        handle.stop()
        doomed.shutdown()
    assert len(outcomes) == 3
    assert all(code == grpc.StatusCode.INTERNAL and "injected device failure" in details
               for code, details in outcomes), outcomes
