"""`loong-jax serve` on two processes x 4 simulated CPU devices (one command per process, as on two hosts):
the leader's gRPC port serves greedy tokens equal to one process with 8 devices, with every prefill and
decode group spanning both processes; SIGTERM on the leader drains, stops the follower, and both exit 0.
The leader gets its place from the flags, the follower from the LOONG_JAX_* environment variables."""

from __future__ import annotations

import concurrent.futures
import signal

from loong_jax.sampling.params import SamplingParams
from tests.distributed.cluster import serve_args, served_cluster, tail, wait_all
from tests.engine_fixtures import mixed_prompts

MAX_TOKENS = 8
STOP_TIMEOUT_S = 60


def test_grpc_tokens_equal_one_process_then_sigterm_stops_both(checkpoint_dir, compile_cache_dir, shared_llm,
                                                               tmp_path):
    from loong_jax.server.client import SERVICE_NAME, LoongClient
    from tests.server.harness import wait_until

    prompts = mixed_prompts(shared_llm.config.vocab_size, seed=3)
    shared_llm.set_policy("fixed", 8, 8, warmup=False)
    expected = [o.outputs[0].token_ids for o in shared_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)]
    args = serve_args(checkpoint_dir, compile_cache_dir / "serve_two_processes", "--drain-timeout", "30")
    with served_cluster(args, tmp_path) as (leader, follower, target):
        with LoongClient(target) as client:
            wait_until(lambda: client.health(SERVICE_NAME) == "SERVING", timeout=120, what="the leader ready")
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:  # all in flight together
                completions = list(pool.map(lambda p: client.complete(p, max_tokens=MAX_TOKENS, temperature=0.0,
                                                                      timeout=180), prompts))
            assert [c.token_ids for c in completions] == expected, tail(tmp_path)
            leader.send_signal(signal.SIGTERM)
        assert wait_all([leader, follower], STOP_TIMEOUT_S) == [0, 0], tail(tmp_path)
