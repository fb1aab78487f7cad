"""A follower that dies (SIGKILL) or hangs (SIGSTOP) while requests stream: within seconds the leader's
health turns NOT_SERVING and every open call ends with UNAVAILABLE (none hangs); the leader then exits 1
after its drain timeout instead of waiting for the lost process."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from tests.distributed.cluster import serve_args, served_cluster, tail, wait_all

STREAMS = 4
LONG = 240  # tokens per stream: far more than the test waits for
DETECT_S = 30  # generous on a shared 2-core machine; the heartbeat window is 5 s


def end_status(iterator) -> grpc.StatusCode:
    try:
        for _ in iterator:
            pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_lost_follower_makes_the_leader_unavailable(fault, checkpoint_dir, compile_cache_dir, tmp_path):
    from loong_jax.server.client import SERVICE_NAME, LoongClient
    from tests.server.harness import wait_until

    args = serve_args(checkpoint_dir, compile_cache_dir / "serve_two_processes", "--drain-timeout", "2")
    with served_cluster(args, tmp_path) as (leader, follower, target):
        try:
            with LoongClient(target) as client:
                wait_until(lambda: client.health(SERVICE_NAME) == "SERVING", timeout=120, what="the leader ready")
                streams = [client.generate([5 + i, 6, 7, 8], max_tokens=LONG, temperature=0.0, ignore_eos=True,
                                           timeout=120) for i in range(STREAMS)]
                iterators = [iter(stream) for stream in streams]
                for iterator in iterators:
                    next(iterator)  # every call is open and streaming
                os.kill(follower.pid, fault)
                wait_until(lambda: client.health(SERVICE_NAME) == "NOT_SERVING", timeout=DETECT_S,
                           what="NOT_SERVING after the follower was lost")
                assert [end_status(iterator) for iterator in iterators] == [grpc.StatusCode.UNAVAILABLE] * STREAMS, \
                    tail(tmp_path)
            assert wait_all([leader], 60) == [1], tail(tmp_path)
        finally:
            if fault == signal.SIGSTOP:
                os.kill(follower.pid, signal.SIGKILL)
