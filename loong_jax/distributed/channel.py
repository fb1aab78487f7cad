"""Plans down, outputs up: the per-step traffic of a multi-process engine over JAX's coordination service.

Why the coordination service's key-value store and not a collective: a collective
(`multihost_utils.broadcast_one_to_all`) is a program on every device of every process, queued behind the
programs already running there, so each plan would wait for the slowest unit in flight and every process
would have to join every step; a key-value write is host-only (one RPC to process 0's coordination
service, about 0.3 ms on loopback), and a follower's read returns as soon as the plan is there.

Keys (one session per engine, numbered by each process's own counter, so that SPMD scripts that build
several engines in the same order agree; everything of a session sits under `loong_jax/<session>/`):
  plan/<epoch>/<step>        the leader's `wire.StepEncoder` bytes of step `step` (epoch = step // EPOCH_STEPS)
  out/<epoch>/<step>/<unit>  the host outputs of a unit the leader takes no part in, from the process
                             that reports it (`reporting_process`: the lowest process of its group)
  ack/<process>              the last step a follower read (written every EPOCH_STEPS // 2 steps)
  closed/<process>           a follower saw the stop message
  alive/<process>            a follower's heartbeat counter (HEARTBEAT_S; see Faults)
  value/<name>               a value the leader decides for every process (`agree`: KV pages per instance)
Data flow of one step: `LeaderChannel.publish` (every plan with work) -> `FollowerChannel.next_step` on
every follower -> the units run on the processes of their groups -> `FollowerChannel.publish_outputs` ->
`LeaderChannel.remote_outputs` (a future the leader's executor waits on like a device fetch). Every
EPOCH_STEPS steps the leader deletes the plan epochs every follower has read (one RPC each), and it deletes
each output key once read: the store holds O(EPOCH_STEPS) keys, not one per step ever run.
The leader's step only encodes the plan and queues it: one writer thread sets the keys in step order.
Faults. JAX's own heartbeats end every process of the job when one dies (its coordination service
aborts the others); `launch.join_cluster` turns on its recoverable mode so that the leader survives to
report, and liveness is read here: each follower bumps its `alive/` counter every HEARTBEAT_S from a
thread of its own (so a long compile or step does not count as a hang); the leader's watcher thread reads
the counters and records `PeerLost` when one has not moved for `dead_after_s` (a dead or hung follower).
`failure()` is what the leader's health reads; waits are cut into `poll_s` slices and end with that
failure instead of waiting forever. A follower whose leader dies gets an error from the coordination
service (it lives in the leader's process) and stops with PeerLost.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Sequence

from loong_jax.distributed.launch import LEADER
from loong_jax.distributed.wire import StepDecoder, StepEncoder, decode_outputs, encode_outputs, encode_stop, \
    seed_unseeded
from loong_jax.executor.protocol import StepInputs
from loong_jax.scheduler.plan import Plan
from loong_jax.sharding.topology import Topology

logger = logging.getLogger(__name__)
EPOCH_STEPS = 256
HEARTBEAT_S = 0.5
DEFAULT_DEAD_AFTER_S = 5.0
ROOT = "loong_jax"


class PeerLost(RuntimeError):
    """A process of the cluster died or stopped answering."""


def open_session(client, process_id: int) -> int:
    """This process's next engine session number (the n-th engine it builds)."""
    return int(client.key_value_increment(f"{ROOT}/sessions/{process_id}", 1))


def reporting_process(topology: Topology, group: Sequence[int]) -> int | None:
    """Which process sends a unit's outputs to the leader: None when the leader runs it itself, else the
    lowest process of its group."""
    processes = topology.group_processes(group)
    return None if LEADER in processes else processes[0]


def agree(client, session: int, name: str, value: int | None, process_id: int, timeout_s: float = 300.0) -> int:
    """The leader's `value` on every process (the leader passes its own; followers get it)."""
    key = f"{ROOT}/{session}/value/{name}"
    if process_id == LEADER:
        client.key_value_set(key, str(value))
        return int(value)
    return int(client.blocking_key_value_get(key, int(timeout_s * 1000)))


@dataclasses.dataclass
class _Link:
    client: object  # jax's DistributedRuntimeClient
    session: int
    poll_s: float = 1.0

    def key(self, *parts) -> str:
        return "/".join([ROOT, str(self.session), *map(str, parts)])

    def wait_for(self, key: str, peers: Sequence[int], timeout_s: float | None = None,
                 failure=lambda: None) -> bytes:
        """The value of `key` once written; PeerLost if `failure()` reports one (or `timeout_s` passes) first."""
        start = time.monotonic()
        while True:
            lost = failure()
            if lost is not None:
                raise lost
            try:
                return self.client.blocking_key_value_get_bytes(key, int(self.poll_s * 1000))
            except Exception as error:  # the runtime raises its own error type; only a timeout is retried
                if "DEADLINE_EXCEEDED" not in str(error) and "timed out" not in str(error).lower():
                    raise PeerLost(f"coordination service: {error}") from error
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise PeerLost(f"no answer from process(es) {list(peers)} within {timeout_s:.0f} s")


class LeaderChannel:
    """The leader's end (`executor.protocol.PlanBroadcast`)."""

    def __init__(self, client, session: int, topology: Topology, num_processes: int, *, poll_s: float = 1.0,
                 close_timeout_s: float = 30.0, dead_after_s: float = DEFAULT_DEAD_AFTER_S):
        self.link = _Link(client, session, poll_s)
        self.topology = topology
        self.followers = tuple(range(1, num_processes))
        self.close_timeout_s = close_timeout_s
        self._step = 0
        self._encoder = StepEncoder()
        self._forgotten_epochs = 0
        self._readers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loong-jax-outputs")
        # One writer thread, so plans go out in order while the step goes on (the RPC is off its path).
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loong-jax-plans")
        self._last_write: concurrent.futures.Future | None = None
        self._closed = False
        # What the broadcast costs: on the step's path (encode, hand over), and in the writer thread (RPC).
        self.published = {"steps": 0, "bytes": 0, "seconds": 0.0, "rpc_seconds": 0.0}
        self.dead_after_s = dead_after_s
        self._lost: PeerLost | None = None
        self._stop_watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch_heartbeats, name="loong-jax-heartbeats", daemon=True)
        self._watcher.start()

    def failure(self) -> PeerLost | None:
        """The lost follower (dead or hung), or None while every follower answers."""
        return self._lost

    def _watch_heartbeats(self) -> None:
        seen: dict[int, tuple[str, float]] = {}  # follower -> (last counter, when it last moved)
        while not self._stop_watching.wait(HEARTBEAT_S):
            now = time.monotonic()
            for follower in self.followers:
                try:
                    counter = self.link.client.key_value_try_get(self.link.key("alive", follower))
                except Exception:  # not beating yet (still loading): counted from its first beat
                    continue
                if follower not in seen or seen[follower][0] != counter:
                    seen[follower] = (counter, now)
                elif now - seen[follower][1] > self.dead_after_s and self._lost is None:
                    self._lost = PeerLost(f"process {follower} of the cluster stopped answering "
                                          f"(no heartbeat for {self.dead_after_s:.0f} s)")
                    logger.error("%s", self._lost)

    def publish(self, plan: Plan, inputs: StepInputs) -> tuple[int, StepInputs]:
        start = time.perf_counter()
        inputs = seed_unseeded(_requests_of(plan, inputs))
        step = self._step
        self._step += 1
        payload = self._encoder.encode(step, plan, inputs)
        self._write(self.link.key("plan", step // EPOCH_STEPS, step), payload)
        if step % EPOCH_STEPS == EPOCH_STEPS - 1:
            self._writer.submit(self._forget_read_epochs)
        self.published["steps"] += 1
        self.published["bytes"] += len(payload)
        self.published["seconds"] += time.perf_counter() - start
        return step, inputs

    def stats(self) -> dict:
        return {f"broadcast_{name}": value for name, value in self.published.items()}

    def _write(self, key: str, payload: bytes) -> None:
        """Queue one key for the writer thread; a failed earlier write is raised here (the step stops)."""
        if self._last_write is not None and self._last_write.done():
            self._last_write.result()
        self._last_write = self._writer.submit(self._set, key, payload)

    def _set(self, key: str, payload: bytes) -> None:
        start = time.perf_counter()
        self.link.client.key_value_set_bytes(key, payload)
        self.published["rpc_seconds"] += time.perf_counter() - start

    def remote_outputs(self, step: int, unit_index: int, group: tuple[int, ...]) -> concurrent.futures.Future:
        reporter = reporting_process(self.topology, group)
        key = self.link.key("out", step // EPOCH_STEPS, step, unit_index)
        return self._readers.submit(self._take_outputs, key, reporter)

    def _take_outputs(self, key: str, reporter: int) -> list:
        outputs = decode_outputs(self.link.wait_for(key, [reporter], failure=self.failure))
        self.link.client.key_value_delete(key)  # read once, by this thread (off the step's critical path)
        return outputs

    def close(self) -> None:
        """The stop message; waits (bounded) until every live follower saw it, then drops the session's keys."""
        if self._closed:
            return
        self._closed = True
        self._stop_watching.set()
        step = self._step
        self._write(self.link.key("plan", step // EPOCH_STEPS, step), encode_stop())
        self._writer.shutdown(wait=True)  # every plan, then the stop message, is out
        for follower in self.followers:
            try:
                self.link.wait_for(self.link.key("closed", follower), [follower], self.close_timeout_s,
                                   failure=self.failure)
            except PeerLost as error:
                logger.warning("follower %d did not confirm the stop: %s", follower, error)
        self._readers.shutdown(wait=False, cancel_futures=True)
        self.link.client.key_value_delete(self.link.key())

    def _forget_read_epochs(self) -> None:
        read = []
        for follower in self.followers:
            try:
                read.append(int(self.link.client.key_value_try_get(self.link.key("ack", follower))))
            except Exception:  # not written yet
                return
        last_full_epoch = (min(read) + 1) // EPOCH_STEPS  # epochs below it were read by every follower
        for epoch in range(self._forgotten_epochs, last_full_epoch):
            self.link.client.key_value_delete(self.link.key("plan", epoch))
        self._forgotten_epochs = max(self._forgotten_epochs, last_full_epoch)


class FollowerChannel:
    """A follower's end: plans in, its reported units' outputs out."""

    def __init__(self, client, session: int, topology: Topology, process_id: int, *, poll_s: float = 1.0):
        self.link = _Link(client, session, poll_s)
        self.topology = topology
        self.process_id = process_id
        self._step = 0
        self._decoder = StepDecoder()
        self._stop_beating = threading.Event()
        threading.Thread(target=self._beat, name="loong-jax-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        beats = 0
        while not self._stop_beating.is_set():
            beats += 1
            try:
                self.link.client.key_value_set(self.link.key("alive", self.process_id), str(beats),
                                               allow_overwrite=True)
            except Exception:  # the leader (and its coordination service) is gone: next_step reports it
                return
            self._stop_beating.wait(HEARTBEAT_S)

    def next_step(self) -> tuple[int, Plan, StepInputs] | None:
        """The next plan and its inputs (waits for the leader), or None once the leader stopped."""
        step = self._step
        message = self._decoder.decode(self.link.wait_for(self.link.key("plan", step // EPOCH_STEPS, step), [LEADER]))
        if message is None:
            return None
        self._step += 1
        if step % (EPOCH_STEPS // 2) == EPOCH_STEPS // 2 - 1:
            self.link.client.key_value_set(self.link.key("ack", self.process_id), str(step), allow_overwrite=True)
        return message

    def reports(self, group: Sequence[int]) -> bool:
        return reporting_process(self.topology, group) == self.process_id

    def publish_outputs(self, step: int, unit_index: int, outputs) -> None:
        self.link.client.key_value_set_bytes(self.link.key("out", step // EPOCH_STEPS, step, unit_index),
                                             encode_outputs(outputs))

    def close(self) -> None:
        self._stop_beating.set()
        self.link.client.key_value_set(self.link.key("closed", self.process_id), "1")


def _requests_of(plan: Plan, inputs: StepInputs) -> StepInputs:
    """Only the requests the plan's units run (the engine passes every running request's row)."""
    wanted = {request_id for unit in plan.work_units() for request_id in unit.all_request_ids}
    if wanted.issuperset(inputs.requests):
        return inputs
    return dataclasses.replace(inputs, requests={r: v for r, v in inputs.requests.items() if r in wanted})
