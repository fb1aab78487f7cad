"""`LLM`: the Python API for notebooks and scripts.

Data flow:
  1. `LLM(...)` (with `cpu_devices=N`: first makes JAX's CPU platform show N devices) loads the model (the
     shipped demo model by default) and its tokenizer, cuts the devices into
     instances of `tp` devices (`Topology`), places the weights on every instance, allocates each
     instance's KV pool (`JaxExecutor`), picks the scheduling policy and compiles the common programs ahead of
     time (progress bar; JAX's persistent compilation cache makes the next start cheap). `describe()` is the
     set-up in force (model, devices, instances x tp, policy, KV pages, cost-model file, compile cache);
     `format_description` makes it the one start-up line `generate` prints and `serve` logs.
  2. `generate(prompts, sampling_params)` turns every prompt (text, token ids or chat messages; the forms
     and their checks are `loong_jax.entrypoints.prompts`, shared with the server) into token ids, validates ALL
     requests first (a bad or empty prompt raises ValueError before anything is queued), queues them,
     runs `engine.step()` until they are done and returns one cumulative `RequestOutput` per prompt, in input
     order, with per-request timings (queue, time to first token, decode).
  3. `stream(prompt, sampling_params)` yields the deltas of one request as they come (what the CLI prints).
Sampling defaults are vLLM's: without `sampling_params` (or with a dict that leaves temperature out) a
request SAMPLES at temperature 1.0; pass temperature=0 for greedy (the `loong-jax` commands default to 0).
Progress bars are drawn only on a terminal (never into files, pipes or logs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from loong_jax.entrypoints.cpu_devices import use_cpu_devices
from loong_jax.engine.llm_engine import Engine, LogicalClock, PreparedRequest
from loong_jax.executor.jax_executor import Buckets, JaxExecutor
from loong_jax.models.demo import resolve_model_path
from loong_jax.models.llama import LlamaForCausalLM
from loong_jax.models.loading import load_hf_checkpoint
from loong_jax.models.tokenizer import Tokenizer
from loong_jax.engine.outputs import RequestOutput
from loong_jax.executor.program_cache import DEFAULT_CACHE_DIR, enable_persistent_cache
from loong_jax.entrypoints.prompts import Prompt, prompt_token_ids, split_prompts
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.cost.model import SHIPPED_DIR, CostModel, load_cost_models
from loong_jax.scheduler.baselines.fixed import FixedPolicy, request_token_limits
from loong_jax.scheduler.groups import aligned_groups
from loong_jax.scheduler.policy import make_policy, policy_names
from loong_jax.scheduler.cost.roofline import TransformerShape, derive_cost_model
from loong_jax.sharding.topology import Topology

CPU_KV_BYTES_PER_INSTANCE = 256 << 20  # default pool size where devices report no memory (CPU)


def build_policy(name: str, num_instances: int, prefill_degree: int | None, decode_degree: int | None,
                 options: dict | None = None):
    """A policy by name; the degrees apply to `fixed` (and `static-sp`, whose single degree is prefill_degree)."""
    options = dict(options or {})
    if name not in policy_names():
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    if name == "fixed":
        policy = make_policy(name, prefill_degree=prefill_degree, decode_degree=decode_degree, **options)
        policy.degrees(num_instances)  # fails now, with the reason, if a degree does not divide the cluster
        return policy
    if name in ("static-sp", "chunked-prefill") and (decode_degree is None or decode_degree == prefill_degree):
        return make_policy(name, degree=prefill_degree, **options)
    if prefill_degree is not None or decode_degree is not None:
        raise ValueError(f"prefill_degree / decode_degree apply to policy 'fixed' (or one degree to 'static-sp' "
                         f"and 'chunked-prefill'), not {name!r}")
    return make_policy(name, **options)


def policy_token_limit(policy, num_instances: int, page_size: int):
    """(pages per instance) -> (longest prompt, largest peak KV) the policy can serve, or None = whole cluster."""
    if isinstance(policy, FixedPolicy):
        return lambda pages: request_token_limits(num_instances, pages, page_size, policy.prefill_degree,
                                                  policy.decode_degree)
    degree = getattr(policy, "degree", None)
    if getattr(policy, "name", "") in ("static-sp", "replicas", "chunked-prefill"):
        degree = degree or num_instances
        return lambda pages: (degree * pages * page_size,) * 2
    return None


def default_kv_pages(config, topology: Topology, page_size: int, memory_fraction: float) -> int:
    """Pages per instance: a fraction of the free device memory, or a fixed budget on CPU."""
    bytes_per_page = (config.num_layers * 2 * page_size * config.num_kv_heads * config.head_dim
                      * np.dtype(config.dtype).itemsize)
    stats = topology.devices[0].memory_stats() if hasattr(topology.devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        budget = free * memory_fraction * topology.tp  # each device holds 1/tp of the instance's pool
    else:
        budget = CPU_KV_BYTES_PER_INSTANCE
    wanted = math.ceil(2 * config.max_context / page_size)  # two full-context requests per instance
    return max(1, min(wanted, int(budget // bytes_per_page)))


def model_shape(config) -> dict:
    """What a step's cost depends on in a model's config (a measured cost model records it)."""
    return {"model_type": config.model_type, "layers": config.num_layers, "hidden": config.hidden_size,
            "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size, "dtype": config.dtype}


def measured_cost_model(config, tp: int, dops: Sequence[int], platform: str) -> CostModel | None:
    """A shipped cost model measured (`loong-jax profile`) for this model shape on this platform, with an
    entry for every degree `dops` names, or None."""
    shape = model_shape(config)
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        section = load_cost_models(path).get(tp)
        if (section is not None and section.provenance == "measured" and section.metadata.get("platform") == platform
                and section.metadata.get("model_shape") == shape and set(dops) <= set(section.dops)):
            return section
    return None


def engine_cost_model(config, tp: int, num_instances: int, pages: int, page_size: int,
                      platform: str | None = None) -> CostModel:
    """The cost model the engine's policy compares step costs with: a shipped measured profile of this
    model shape on this platform when there is one, else a roofline derivation of the shape."""
    dops = tuple(sorted({len(g) for g in aligned_groups(num_instances)}))
    measured = measured_cost_model(config, tp, dops, platform or jax.default_backend())
    if measured is not None:
        return dataclasses.replace(measured, pages_per_instance=pages, page_size=page_size)
    shape = TransformerShape(name=config.model_type, layers=config.num_layers, hidden=config.hidden_size,
                             heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                             intermediate=config.intermediate_size, vocab=config.vocab_size,
                             bytes_per_value=np.dtype(config.dtype).itemsize)
    model = derive_cost_model(shape, tp=tp, dops=dops, page_size=page_size)
    return dataclasses.replace(model, pages_per_instance=pages, page_size=page_size)


class LLM:
    def __init__(self, model: str | Path | LlamaForCausalLM | None = None, tp: int = 1, instances: int | None = None,
                 page_size: int = 16, kv_pages: int | None = None, policy: str = "esp",
                 prefill_degree: int | None = None, decode_degree: int | None = None, *,
                 tokenizer: Tokenizer | str | Path | None = None, dtype: str | None = None,
                 devices: Sequence[jax.Device] | None = None, policy_options: dict | None = None,
                 cost_model: CostModel | str | Path | None = None, buckets: Buckets = Buckets(),
                 warmup: bool = True, compilation_cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                 kv_memory_fraction: float = 0.5, progress: bool = True, deterministic: bool = False,
                 cpu_devices: int | None = None):
        """deterministic: units complete in dispatch order and the engine runs on a logical clock, so a run
        (scheduling decisions included) repeats exactly; for debugging and tests (timings become step counts,
        groups no longer overlap in time).
        cpu_devices: run on this many simulated CPU devices; it must come before JAX's first use in the
        process (ValueError if JAX already started with another count)."""
        use_cpu_devices(cpu_devices)  # before anything below asks JAX for devices
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if kv_pages is not None and kv_pages < 1:
            raise ValueError(f"kv_pages must be >= 1, got {kv_pages}")
        # The directory in force: the first one configured in this process wins (JAX's cache is global).
        self.compilation_cache_dir = enable_persistent_cache(compilation_cache_dir)
        loaded, self.tokenizer = _load(model, tokenizer, dtype)
        self.config = loaded.config
        self.model_name = _model_name(model, self.config)
        devices = list(jax.devices() if devices is None else devices)
        if tp < 1 or len(devices) < tp:
            raise ValueError(f"tp={tp} needs at least {tp} devices, {len(devices)} available")
        instances = len(devices) // tp if instances is None else instances
        if instances < 1 or instances * tp > len(devices):
            raise ValueError(f"{instances} instances of tp={tp} need {instances * tp} devices, {len(devices)} available")
        self.topology = Topology(devices[:instances * tp], tp)
        pages = kv_pages or default_kv_pages(self.config, self.topology, page_size, kv_memory_fraction)
        self.deterministic = deterministic
        self._clock = LogicalClock() if deterministic else time.monotonic
        # The executor places one copy of the weights per instance; the loaded copy is not kept.
        self.executor = JaxExecutor(loaded, self.topology, pages, page_size,
                                    eos_token_ids=self.tokenizer.eos_token_ids, buckets=buckets,
                                    clock=self._clock, in_dispatch_order=deterministic)
        del loaded
        if isinstance(cost_model, (str, Path)):
            cost_model = CostModel.load_json(cost_model, tp=tp)
        self.cost_model = cost_model or engine_cost_model(self.config, tp, instances, pages, page_size,
                                                             self.topology.devices[0].platform)
        self.cost_model.check_instances(instances)
        self.progress = progress
        self._request_ids = itertools.count()
        self.engine: Engine | None = None
        self.set_policy(policy, prefill_degree, decode_degree, policy_options, warmup=warmup)

    # -- configuration ----------------------------------------------------------------------------------------
    def set_policy(self, policy: str = "esp", prefill_degree: int | None = None, decode_degree: int | None = None,
                   policy_options: dict | None = None, warmup: bool = True) -> None:
        """Switch the scheduling policy (between generate calls); compiled programs are kept."""
        if self.engine is not None and self.engine.has_unfinished():
            raise RuntimeError("cannot switch policy while requests are running")
        n = self.topology.num_instances
        built = build_policy(policy, n, prefill_degree, decode_degree, policy_options)
        self.engine = Engine(self.executor, self.tokenizer, built, self.cost_model,
                             max_context=self.config.max_context,
                             request_token_limit=policy_token_limit(built, n, self.executor.page_size),
                             clock=self._clock, compile_aware=not self.deterministic)
        if warmup:
            self.warm_up()

    def warm_up(self) -> None:
        """Compile the programs this policy runs most, ahead of time (with a progress bar)."""
        policy, n = self.engine.policy, self.topology.num_instances
        if isinstance(policy, FixedPolicy):
            prefill_groups, decode_groups = policy.groups(n)
        else:  # elastic policies: whole-cluster prefill, single-instance decode; the rest on demand
            prefill_groups, decode_groups = [tuple(range(n))], [(i,) for i in range(n)]
        self.executor.programs.warm_up(self.executor.common_keys(prefill_groups, decode_groups),
                                       progress=self.progress)

    # -- requests ----------------------------------------------------------------------------------------------
    def prepare(self, prompt: Prompt, sampling_params: SamplingParams | dict | None = None,
                request_id: str | None = None) -> PreparedRequest:
        """Tokenize and validate one request (ValueError naming any problem); nothing is queued."""
        text, ids = prompt_token_ids(prompt, self.tokenizer, self.engine.vocab_size)
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        return self.engine.validate_request(request_id, ids, sampling_params, prompt=text)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one finished, cumulative RequestOutput per prompt, in order.

        sampling_params: one for all prompts or one per prompt; None = `SamplingParams()`, which samples at
        temperature 1.0 like vLLM (temperature=0 is greedy). A malformed or empty prompt raises ValueError
        and nothing runs. use_tqdm: a progress bar, on a terminal only."""
        prompt_list = split_prompts(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompt_list):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(prompt_list)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompt_list)
        prepared = [self.prepare(p, s) for p, s in zip(prompt_list, params_list)]
        if len({r.request_id for r in prepared}) != len(prepared):
            raise ValueError("request ids must be unique")
        for request in prepared:
            self.engine.add_request(request)
        results: dict[str, RequestOutput] = {
            r.request_id: RequestOutput(r.request_id, r.prompt, list(r.prompt_token_ids), [], False)
            for r in prepared}
        bar = None
        if use_tqdm and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prepared), desc="generating", unit="request", disable=None)  # None: tty only
        deltas: dict[str, list[RequestOutput]] = {request_id: [] for request_id in results}
        try:
            pending = set(results)
            while pending:
                if not self.engine.has_unfinished():
                    raise RuntimeError(f"engine finished without completing requests {sorted(pending)}")
                for delta in self.engine.step():
                    if delta.request_id in results:
                        deltas[delta.request_id].append(delta)  # merged once at the end, in linear time
                        if delta.finished:
                            pending.discard(delta.request_id)
                            if bar is not None:
                                bar.update(1)
        except BaseException:
            for request_id in results:  # leave nothing half-run behind (e.g. KeyboardInterrupt)
                self.engine.abort(request_id)
            self._drain()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r.request_id].merged_all(deltas[r.request_id]) for r in prepared]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | dict | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield the deltas of one request as they are produced (other queued requests run alongside).

        sampling_params None = `SamplingParams()`: temperature 1.0 (sampling) like vLLM; pass
        {"temperature": 0} for greedy. A malformed or empty prompt raises ValueError before anything runs."""
        request = self.prepare(prompt, sampling_params, request_id)
        self.engine.add_request(request)
        finished = False
        try:
            while not finished:
                if not self.engine.has_unfinished():
                    raise RuntimeError(f"engine finished without completing request {request.request_id!r}")
                for delta in self.engine.step():
                    if delta.request_id == request.request_id:
                        finished = delta.finished
                        yield delta
        finally:
            if not finished:
                self.engine.abort(request.request_id)
                self._drain()

    def _drain(self) -> None:
        while self.engine.has_unfinished() and (self.engine.num_unfinished or self.executor.in_flight):
            self.engine.step()
        self.engine.take_outputs()

    # -- introspection / lifetime -----------------------------------------------------------------------------
    def describe(self) -> dict:
        """The set-up in force, as plain values (what the start-up summary shows)."""
        devices = self.topology.devices
        return {"model": self.model_name, "platform": devices[0].platform, "devices": len(devices),
                "local_devices": jax.device_count(), "instances": self.topology.num_instances,
                "tp": self.topology.tp, "policy": self.engine.policy.name,
                "kv_pages_per_instance": self.executor.pool_shape.pages, "page_size": self.executor.page_size,
                "cost_model": self.cost_model.source or "none", "cost_model_provenance": self.cost_model.provenance,
                "compilation_cache_dir": None if self.compilation_cache_dir is None else str(self.compilation_cache_dir)}

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_description(description: dict) -> str:
    """`LLM.describe()` as one line, e.g. `model .../demo_model | cpu: 8 of 8 devices | 8 instances x tp 1 |
    policy esp | KV 512 pages x 16 tokens per instance | cost model .../cpu_demo.json (measured) | ...`."""
    d = description
    cost_model = ("none (roofline estimate from the model shape)" if d["cost_model"] == "none"
                  else f"{d['cost_model']} ({d['cost_model_provenance']})")
    return (f"model {d['model']} | {d['platform']}: {d['devices']} of {d['local_devices']} devices | "
            f"{d['instances']} instances x tp {d['tp']} | policy {d['policy']} | "
            f"KV {d['kv_pages_per_instance']} pages x {d['page_size']} tokens per instance | "
            f"cost model {cost_model} | compilation cache {d['compilation_cache_dir'] or 'off'}")


def _model_name(model, config) -> str:
    if isinstance(model, LlamaForCausalLM):
        return f"in-memory {config.model_type}"
    return str(resolve_model_path(model))


def _load(model, tokenizer, dtype):
    if isinstance(model, LlamaForCausalLM):
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer (tokenizer=Tokenizer or a folder)")
        loaded = model if dtype is None or dtype == model.config.dtype else None
        if loaded is None:
            raise ValueError("dtype cannot be changed for an in-memory model")
    else:
        path = resolve_model_path(model)
        loaded, _ = load_hf_checkpoint(path, dtype)
        tokenizer = tokenizer if tokenizer is not None else path
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_dir(tokenizer)
    return loaded, tokenizer
