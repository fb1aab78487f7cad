"""Engine construction: the one place that turns `LLM(...)`'s options into an engine's parts.

It lives with the entry points because building an engine touches every room: the checkpoint and tokenizer
(`loong_jax.models`), the devices cut into instances (`loong_jax.sharding`), the JAX executor, the cost
model and the policy (`loong_jax.scheduler`). The engine room (`loong_jax.engine`) knows only the executor
protocol and the scheduler's plans, never the JAX executor or the model loaders (so it runs as well over
the simulator's executor), and must not import upwards: only entry points assemble.

Data flow:
  1. `EngineConfig(...)`: the options `LLM(...)` and `AsyncLLM(...)` take (positional order: model, tp,
     instances, page_size, kv_pages, policy, prefill_degree, decode_degree; the rest by keyword), checked
     when made (ValueError).
  2. `build_engine_parts(config)`: simulated CPU devices if asked (before JAX starts), the persistent
     compilation cache, the devices cut into instances of `tp` (`build_topology`, before any weight is
     read), the tokenizer and model, the KV pages per instance (`default_kv_pages`), the `JaxExecutor`
     (`build_executor`: one copy of the weights per instance) and the cost model (given, a shipped
     measured profile of this model shape and platform, or a roofline derivation).
     Over several processes (`coordinator`, `num_processes`, `process_id`; `loong_jax.distributed`) the
     process first joins JAX's multi-controller runtime; the topology is the whole cluster's, the KV pages
     per instance are the leader's choice on every process, and the leader's executor publishes each plan
     to the followers (`distributed.channel.LeaderChannel`); a follower's parts go to
     `distributed.follower.run_follower`, never into an `Engine`.
  3. `build_engine(parts, policy, prefill_degree, decode_degree, options)`: the policy (each policy reads
     its own degrees and options, `scheduler.policy.build_policy`) and the `Engine` over the parts; the
     parts outlive it, so switching policy keeps the compiled programs.
`loong-jax profile` uses steps 1 and 2's `build_topology` / `load_checkpoint` / `build_executor` alone: it
measures the executor the engine runs, without an engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from loong_jax.distributed.channel import FollowerChannel, LeaderChannel, agree, open_session
from loong_jax.distributed.launch import ClusterOptions, cluster_options, coordination_client, join_cluster
from loong_jax.engine.llm_engine import Engine, LogicalClock
from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.entrypoints.cpu_devices import use_cpu_devices
from loong_jax.executor.jax_executor import Buckets, JaxExecutor
from loong_jax.executor.program_cache import DEFAULT_CACHE_DIR, enable_persistent_cache
from loong_jax.models.demo import resolve_model_path
from loong_jax.models.llama import LlamaForCausalLM
from loong_jax.models.loading import load_hf_checkpoint
from loong_jax.models.tokenizer import Tokenizer
from loong_jax.scheduler.cost.model import SHIPPED_DIR, CostModel, load_cost_models
from loong_jax.scheduler.cost.roofline import TransformerShape, derive_cost_model
from loong_jax.scheduler.groups import aligned_groups
from loong_jax.scheduler.policy import DEFAULT_POLICY, build_policy
from loong_jax.sharding.topology import Topology

CPU_KV_BYTES_PER_INSTANCE = 256 << 20  # default pool size where devices report no memory (CPU)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine is built from. model: a checkpoint folder (None: the shipped demo model) or an
    in-memory `LlamaForCausalLM` (then `tokenizer` is required). instances: None = as many as the devices
    hold. kv_pages: per instance; None = `kv_memory_fraction` of the free device memory (a fixed budget on
    CPU). policy / prefill_degree / decode_degree / policy_options: the scheduling policy
    (`loong_jax.scheduler.policy.build_policy`). cost_model: a CostModel or a JSON file; None = a shipped
    measured one for this model shape and platform, else a roofline estimate. deterministic: units complete
    in dispatch order and the engine runs on a logical clock, so a run (scheduling decisions included)
    repeats exactly; for debugging and tests (timings become step counts, groups no longer overlap in time).
    async_scheduling: plan each step while the previous one runs on the devices, its tokens fed there
    (`loong_jax.engine.core`; one process only); off: every step waits for its tokens before the next plan.
    prefix_caching: keep the KV pages of prompt prefixes after their requests finish and reuse them for
    requests that start with the same tokens (`loong_jax.engine.prefix_cache`; on by default);
    prefix_cache_fraction: the share of each instance's pages the cache may hold (idle cached pages are
    evicted, least recently used first, whenever an allocation needs them).
    cpu_devices: run on this many simulated CPU devices; it must come before JAX's first use in the
    process (ValueError if JAX already started with another count); over several processes it is each
    process's own device count. coordinator / num_processes / process_id: a multi-process launch (all
    three or none; `loong_jax.distributed`): every process builds the same config, process 0 leads."""

    model: str | Path | LlamaForCausalLM | None = None
    tp: int = 1
    instances: int | None = None
    page_size: int = 16
    kv_pages: int | None = None
    policy: str = DEFAULT_POLICY
    prefill_degree: int | None = None
    decode_degree: int | None = None
    _: dataclasses.KW_ONLY
    tokenizer: Tokenizer | str | Path | None = None
    dtype: str | None = None
    scan_layers: bool | None = None  # a checkpoint's layers under one lax.scan (None: yes); False: unrolled
    devices: Sequence[Any] | None = None  # jax.Device; None = every device JAX sees
    policy_options: dict | None = None
    cost_model: CostModel | str | Path | None = None
    buckets: Buckets = Buckets()
    warmup: bool = True
    compilation_cache_dir: str | Path | None = DEFAULT_CACHE_DIR
    kv_memory_fraction: float = 0.5
    progress: bool = True
    deterministic: bool = False
    async_scheduling: bool = True
    prefix_caching: bool = True
    prefix_cache_fraction: float = 1.0
    cpu_devices: int | None = None
    coordinator: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        cluster_options(self.coordinator, self.num_processes, self.process_id)  # ValueError before loading
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.kv_pages is not None and self.kv_pages < 1:
            raise ValueError(f"kv_pages must be >= 1, got {self.kv_pages}")
        if not 0.0 <= self.prefix_cache_fraction <= 1.0:
            raise ValueError(f"prefix_cache_fraction must be in [0, 1], got {self.prefix_cache_fraction}")

    @property
    def cluster(self) -> ClusterOptions | None:
        """The multi-process launch options, or None for a single process."""
        return cluster_options(self.coordinator, self.num_processes, self.process_id)


@dataclasses.dataclass(frozen=True)
class EngineParts:
    """What an engine runs on; built once, kept across policy switches."""

    tokenizer: Tokenizer
    model_config: Any  # the model's config (context length, vocabulary, shape)
    model_name: str
    topology: Topology
    executor: JaxExecutor
    cost_model: CostModel
    clock: Callable[[], float]
    deterministic: bool
    async_scheduling: bool
    compilation_cache_dir: Path | None  # the directory in force (the first one configured in the process)
    cluster: ClusterOptions | None = None  # over several processes: this process's place
    session: int | None = None  # over several processes: the engine's number in the coordination service
    follower_channel: FollowerChannel | None = None  # a follower's end (its heartbeat runs from the start)
    prefix_cache: PrefixCacheOptions = PrefixCacheOptions()


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Step 2 of the module docstring."""
    use_cpu_devices(config.cpu_devices)  # before anything below asks JAX for devices
    cluster = config.cluster
    if cluster is not None:
        join_cluster(cluster)  # before JAX's backends start: then jax.devices() is the whole cluster's
    cache_dir = enable_persistent_cache(config.compilation_cache_dir)  # JAX's cache is global: first one wins
    topology = build_topology(config.devices, config.tp, config.instances)
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    model = load_checkpoint(config.model, config.dtype, config.scan_layers)
    clock = LogicalClock() if config.deterministic else time.monotonic
    pages = config.kv_pages or default_kv_pages(model.config, topology, config.page_size, config.kv_memory_fraction)
    session, broadcast, follower_channel = None, None, None
    if cluster is not None:
        client = coordination_client()
        session = open_session(client, cluster.process_id)
        if not cluster.is_leader:  # beating from now on: loading and compiling are not a hang
            follower_channel = FollowerChannel(client, session, topology, cluster.process_id)
        pages = agree(client, session, "kv_pages", pages, cluster.process_id)  # one pool shape everywhere
        if cluster.is_leader and cluster.num_processes > 1:
            broadcast = LeaderChannel(client, session, topology, cluster.num_processes)
    # The executor places one copy of the weights per instance; the loaded copy is not kept.
    executor = build_executor(dataclasses.replace(config, kv_pages=pages), model, topology,
                              eos_token_ids=tokenizer.eos_token_ids, clock=clock, broadcast=broadcast)
    cost_model = resolve_cost_model(config.cost_model, model.config, topology, executor.pool_shape.pages,
                                    executor.page_size)
    name = model_name(config.model, model.config)
    prefix_cache = PrefixCacheOptions(config.prefix_caching, config.prefix_cache_fraction,
                                      model_identity=f"{name}:{model.config.dtype}")
    return EngineParts(tokenizer, model.config, name, topology, executor,
                       cost_model, clock, config.deterministic, config.async_scheduling, cache_dir, cluster, session,
                       follower_channel, prefix_cache)


def build_engine(parts: EngineParts, policy: str = DEFAULT_POLICY, prefill_degree: int | None = None,
                 decode_degree: int | None = None, policy_options: dict | None = None) -> Engine:
    """An engine over `parts` with the named policy (ValueError naming what does not apply or fit)."""
    built = build_policy(policy, parts.topology.num_instances, prefill_degree, decode_degree, policy_options)
    executor, model_config = parts.executor, parts.model_config
    return Engine(executor, parts.tokenizer, built, parts.cost_model, max_context=model_config.max_context,
                  vocab_size=model_config.vocab_size, pages_per_instance=executor.pool_shape.pages,
                  page_size=executor.page_size, clock=parts.clock, compile_aware=not parts.deterministic,
                  async_scheduling=parts.async_scheduling, prefix_cache=parts.prefix_cache)


# -- devices, weights, executor ---------------------------------------------------------------------------------
def build_topology(devices: Sequence[Any] | None, tp: int, instances: int | None) -> Topology:
    """`instances` (None: as many as fit) instances of `tp` consecutive devices."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or len(devices) < tp:
        raise ValueError(f"tp={tp} needs at least {tp} devices, {len(devices)} available")
    instances = len(devices) // tp if instances is None else instances
    if instances < 1 or instances * tp > len(devices):
        raise ValueError(f"{instances} instances of tp={tp} need {instances * tp} devices, {len(devices)} available")
    return Topology(devices[:instances * tp], tp)


def load_tokenizer(model, tokenizer) -> Tokenizer:
    """The given tokenizer (or folder), else the checkpoint folder's; an in-memory model needs one given."""
    if tokenizer is None:
        if isinstance(model, LlamaForCausalLM):
            raise ValueError("an in-memory model needs its tokenizer (tokenizer=Tokenizer or a folder)")
        tokenizer = resolve_model_path(model)
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_dir(tokenizer)


def load_checkpoint(model, dtype: str | None, scan_layers: bool | None = None) -> LlamaForCausalLM:
    """An in-memory model as it is, or the checkpoint folder (None: the shipped demo model) loaded."""
    if isinstance(model, LlamaForCausalLM):
        if dtype is not None and dtype != model.config.dtype:
            raise ValueError("dtype cannot be changed for an in-memory model")
        if scan_layers is not None and scan_layers != model.config.scan_layers:
            raise ValueError("scan_layers cannot be changed for an in-memory model")
        return model
    loaded, _ = load_hf_checkpoint(resolve_model_path(model), dtype, scan_layers=scan_layers is not False)
    return loaded


def model_name(model, model_config) -> str:
    if isinstance(model, LlamaForCausalLM):
        return f"in-memory {model_config.model_type}"
    return str(resolve_model_path(model))


def build_executor(config: EngineConfig, model: LlamaForCausalLM, topology: Topology, *,
                   eos_token_ids: Sequence[int] = (), clock: Callable[[], float] = time.monotonic,
                   broadcast=None) -> JaxExecutor:
    """The engine's executor: `model`'s weights on every instance of `topology` and each instance's KV pool
    (this process's instances only, over several processes; the leader's `broadcast` sends its plans)."""
    pages = config.kv_pages or default_kv_pages(model.config, topology, config.page_size, config.kv_memory_fraction)
    return JaxExecutor(model, topology, pages, config.page_size, eos_token_ids=eos_token_ids, buckets=config.buckets,
                       clock=clock, in_dispatch_order=config.deterministic, broadcast=broadcast)


def default_kv_pages(model_config, topology: Topology, page_size: int, memory_fraction: float) -> int:
    """Pages per instance: a fraction of the free device memory, or a fixed budget on CPU."""
    bytes_per_page = (model_config.num_layers * 2 * page_size * model_config.num_kv_heads * model_config.head_dim
                      * np.dtype(model_config.dtype).itemsize)
    device = next(d for d in topology.devices if d.process_index == topology.process_index)  # one of ours
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        budget = free * memory_fraction * topology.tp  # each device holds 1/tp of the instance's pool
    else:
        budget = CPU_KV_BYTES_PER_INSTANCE
    wanted = math.ceil(2 * model_config.max_context / page_size)  # two full-context requests per instance
    return max(1, min(wanted, int(budget // bytes_per_page)))


# -- cost model -------------------------------------------------------------------------------------------------
def resolve_cost_model(cost_model: CostModel | str | Path | None, model_config, topology: Topology, pages: int,
                       page_size: int) -> CostModel:
    """The given cost model (or JSON file), else `engine_cost_model`; it must cover the instances."""
    if isinstance(cost_model, (str, Path)):
        cost_model = CostModel.load_json(cost_model, tp=topology.tp)
    cost_model = cost_model or engine_cost_model(model_config, topology.tp, topology.num_instances, pages, page_size,
                                                 topology.devices[0].platform)
    cost_model.check_instances(topology.num_instances)
    return cost_model


def model_shape(model_config) -> dict:
    """What a step's cost depends on in a model's config (a measured cost model records it)."""
    c = model_config
    return {"model_type": c.model_type, "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads,
            "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate": c.intermediate_size,
            "vocab": c.vocab_size, "dtype": c.dtype}


def measured_cost_model(model_config, tp: int, dops: Sequence[int], platform: str) -> CostModel | None:
    """A shipped cost model measured (`loong-jax profile`) for this model shape on this platform, with an
    entry for every degree `dops` names, or None."""
    shape = model_shape(model_config)
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        section = load_cost_models(path).get(tp)
        if (section is not None and section.provenance == "measured" and section.metadata.get("platform") == platform
                and section.metadata.get("model_shape") == shape and set(dops) <= set(section.dops)):
            return section
    return None


def engine_cost_model(model_config, tp: int, num_instances: int, pages: int, page_size: int,
                      platform: str | None = None) -> CostModel:
    """The cost model the engine's policy compares step costs with: a shipped measured profile of this
    model shape on this platform when there is one, else a roofline derivation of the shape."""
    dops = tuple(sorted({len(g) for g in aligned_groups(num_instances)}))
    measured = measured_cost_model(model_config, tp, dops, platform or jax.default_backend())
    if measured is not None:
        return dataclasses.replace(measured, pages_per_instance=pages, page_size=page_size)
    c = model_config
    shape = TransformerShape(name=c.model_type, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                             kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate=c.intermediate_size,
                             vocab=c.vocab_size, bytes_per_value=np.dtype(c.dtype).itemsize)
    model = derive_cost_model(shape, tp=tp, dops=dops, page_size=page_size)
    return dataclasses.replace(model, pages_per_instance=pages, page_size=page_size)
