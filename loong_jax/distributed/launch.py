"""Launch options of a multi-process engine, and joining JAX's multi-controller runtime with them.

Data flow:
  1. `ClusterOptions(coordinator, num_processes, process_id)`: where process 0 runs JAX's coordination
     service (HOST:PORT), how many processes the cluster has and which one this is; checked when made
     (ValueError naming the option), so a typo fails before any weight is read. `cluster_options(...)`
     builds them from the three values (all or none), `from_env()` from `LOONG_JAX_COORDINATOR`,
     `LOONG_JAX_NUM_PROCESSES` and `LOONG_JAX_PROCESS_ID` (what SLURM / Kubernetes launchers set).
  2. `join_cluster(options)` calls `jax.distributed.initialize` once per process, before JAX's backends
     start (after `cpu_devices.use_cpu_devices`, which sets the local device count). From then on
     `jax.devices()` is the whole cluster's devices and `jax.local_devices()` this process's; collectives
     across processes run over JAX's own transports (NCCL on GPUs, gloo on CPUs).
  3. `coordination_client()` is the runtime's client of the coordination service: its key-value store
     carries the per-step plans (`loong_jax.distributed.channel`).
  4. `leave_cluster(code)` ends a follower's process once its leader stopped: the coordination service
     lives in the leader's process, which may already be gone, and JAX's own exit handshake with it would
     then abort the follower (in recoverable mode nothing waits for it); so the follower flushes its logs
     and exits without that handshake.
Process 0 is the leader (scheduler, server, health, metrics); the others are followers
(`loong_jax.distributed.follower`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Mapping

ENV_COORDINATOR = "LOONG_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LOONG_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LOONG_JAX_PROCESS_ID"
LEADER = 0
# Seconds without a heartbeat after which JAX's coordination service declares a process dead.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """One process's place in a cluster of `num_processes` processes coordinated at `coordinator`."""

    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    def __post_init__(self):
        host, _, port = str(self.coordinator).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be HOST:PORT (e.g. 10.0.0.1:8476), got {self.coordinator!r}")
        if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise ValueError(f"num_processes must be a positive integer, got {self.num_processes!r}")
        if (isinstance(self.process_id, bool) or not isinstance(self.process_id, int)
                or not 0 <= self.process_id < self.num_processes):
            raise ValueError(f"process_id must be an integer in [0, {self.num_processes - 1}] "
                             f"(num_processes={self.num_processes}), got {self.process_id!r}")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"heartbeat_timeout_s must be >= 1, got {self.heartbeat_timeout_s}")

    @property
    def is_leader(self) -> bool:
        return self.process_id == LEADER


def cluster_options(coordinator: str | None, num_processes: int | None,
                    process_id: int | None) -> ClusterOptions | None:
    """The three launch values -> ClusterOptions (None when none is given; ValueError when only some are)."""
    values = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    given = {name for name, value in values.items() if value is not None}
    if not given:
        return None
    if given != set(values):
        missing = ", ".join(sorted(set(values) - given))
        raise ValueError(f"a multi-process launch needs coordinator, num_processes and process_id together; "
                         f"missing: {missing}")
    return ClusterOptions(coordinator, num_processes, process_id)


def from_env(environ: Mapping[str, str] | None = None) -> dict:
    """The launch values set in the environment (absent ones left out), as `cluster_options` keywords."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    if environ.get(ENV_COORDINATOR):
        values["coordinator"] = environ[ENV_COORDINATOR]
    for name, variable in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        text = environ.get(variable)
        if text:
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"{variable} must be an integer, got {text!r}") from None
    return values


def join_cluster(options: ClusterOptions) -> None:
    """`jax.distributed.initialize` with these options, once per process (a second call with the same
    options does nothing; with other options it is a ValueError)."""
    import jax
    from jax._src import distributed

    state = distributed.global_state
    if state.client is not None:
        if (state.coordinator_address, state.num_processes, state.process_id) != (
                options.coordinator, options.num_processes, options.process_id):
            raise ValueError(f"this process already joined the cluster at {state.coordinator_address} as process "
                             f"{state.process_id} of {state.num_processes}; one cluster per process")
        return
    # JAX's preemption service catches SIGTERM for training checkpoints; a server drains on it instead.
    jax.config.update("jax_enable_preemption_service", False)
    # By default JAX's coordination service ends every process when one dies; recoverable, the leader
    # lives on to report the loss (health NOT_SERVING, calls UNAVAILABLE: `channel` watches heartbeats).
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id,
                               heartbeat_timeout_seconds=options.heartbeat_timeout_s)


def coordination_client():
    """The client of JAX's coordination service (its key-value store carries the plans)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("this process has not joined a cluster (join_cluster)")
    return client


def leave_cluster(code: int = 0) -> None:
    """End this follower process now with `code` (step 4 of the module docstring); never returns."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
