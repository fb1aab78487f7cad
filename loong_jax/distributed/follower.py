"""A follower process: no scheduler, no server; each step it runs its share of the leader's plan.

Data flow:
  1. `run_follower(config)`: the same `EngineConfig` as the leader's (`process_id` > 0). The engine parts
     are built exactly as on the leader (`engine_config.build_engine_parts`: join the cluster, load the
     weights, the cluster's topology with this process's instances, their KV pools), and the programs of
     the policy's warm-up groups that touch this process are compiled.
  2. Loop: `FollowerChannel.next_step()` -> `JaxExecutor.submit_step(plan, inputs, step)` dispatches, in
     the plan's order, the units whose group holds one of this process's instances (a group across
     processes runs in all of them at once, its collectives over JAX's transports) -> `collect()` waits
     for them -> the outputs of units the leader takes no part in go up (`publish_outputs`, sent by the
     lowest process of the group).
  3. The leader's stop message (its engine closed) ends the loop: the follower confirms and returns; a
     process whose last engine this was ends with `launch.leave_cluster` (no exit handshake with a
     coordination service that may be gone with the leader).
The follower waits for its units of one step before it reads the next (simple, and the leader's plans
never make a unit depend on a later one); a dead leader raises `channel.PeerLost`.
"""

from __future__ import annotations

import logging

from loong_jax.distributed.channel import FollowerChannel
from loong_jax.entrypoints.engine_config import EngineConfig, EngineParts, build_engine_parts
from loong_jax.scheduler.policy import build_policy

logger = logging.getLogger(__name__)


def run_follower(config: EngineConfig) -> int:
    """Serve the leader's steps until it stops; returns the number of steps run."""
    cluster = config.cluster
    if cluster is None or cluster.is_leader:
        raise ValueError("run_follower is for processes with process_id > 0 of a multi-process launch")
    parts = build_engine_parts(config)
    try:
        if config.warmup:
            warm_up(parts, config)
        channel = parts.follower_channel
        steps = follow(parts.executor, channel)
        channel.close()
        logger.info("follower %d: the leader stopped after %d steps", cluster.process_id, steps)
        return steps
    finally:
        parts.executor.close()


def warm_up(parts: EngineParts, config: EngineConfig) -> None:
    """Compile the warm-up programs of the leader's policy on the groups this process takes part in."""
    policy = build_policy(config.policy, parts.topology.num_instances, config.prefill_degree, config.decode_degree,
                          config.policy_options)
    prefill_groups, decode_groups = policy.warmup_groups(parts.topology.num_instances)
    executor = parts.executor
    executor.programs.warm_up(executor.common_keys(prefill_groups, decode_groups), progress=config.progress)


def follow(executor, channel: FollowerChannel) -> int:
    """Step 2 of the module docstring; returns the steps run."""
    steps = 0
    while (message := channel.next_step()) is not None:
        step, plan, inputs = message
        executor.submit_step(plan, inputs, step)
        for launch, outputs in executor.collect():
            if channel.reports(launch.unit.group):
                channel.publish_outputs(step, launch.index, [
                    None if part.key.kind == "migrate" else output
                    for part, output in zip(launch.programs, outputs)])
        steps += 1
    return steps
