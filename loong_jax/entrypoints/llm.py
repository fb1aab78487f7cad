"""`LLM`: the Python API for notebooks and scripts.

Data flow:
  1. `LLM(...)` takes `EngineConfig`'s options (or `LLM(engine_config=...)`) and has
     `loong_jax.entrypoints.engine_config` build the engine's parts: with `cpu_devices=N` JAX's CPU platform
     first shows N devices; the model (the shipped demo model by default) and its tokenizer are loaded, the
     devices cut into instances of `tp` devices (`Topology`), the weights placed on every instance and each
     instance's KV pool allocated (`JaxExecutor`); then the scheduling policy is built and the programs it
     runs most (`Policy.warmup_groups`) are compiled ahead of time (progress bar; JAX's persistent
     compilation cache makes the next start cheap). `describe()` is the set-up in force (model, devices,
     instances x tp, policy, KV pages, cost-model file, compile cache); `format_description` makes it the
     one start-up line `generate` prints and `serve` logs. `snapshot()` is the engine's state at this
     instant (`loong_jax.engine.snapshot`).
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

import itertools
from typing import Iterator, Sequence

import jax

from loong_jax.engine.llm_engine import Engine, PreparedRequest
from loong_jax.engine.snapshot import EngineSnapshot
from loong_jax.entrypoints.engine_config import EngineConfig, build_engine, build_engine_parts
from loong_jax.entrypoints.prompts import Prompt, prompt_token_ids, split_prompts
from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams


class LLM:
    def __init__(self, *args, engine_config: EngineConfig | None = None, **options):
        """`LLM(model, tp, instances, page_size, kv_pages, policy, prefill_degree, decode_degree, *, ...)`: the
        options and their meaning are `EngineConfig`'s; or one `engine_config=EngineConfig(...)`."""
        if engine_config is None:
            engine_config = EngineConfig(*args, **options)
        elif args or options:
            raise ValueError("give LLM either engine_config or its options, not both")
        cluster = engine_config.cluster
        if cluster is not None and not cluster.is_leader:
            raise ValueError(f"process_id {cluster.process_id} is a follower: it runs no engine; call "
                             "loong_jax.distributed.follower.run_follower(EngineConfig(...)) with the same options "
                             "(or `loong-jax serve`), and LLM(...) on process 0")
        self.engine_config = engine_config
        parts = build_engine_parts(engine_config)
        self._parts = parts
        self.tokenizer, self.config, self.model_name = parts.tokenizer, parts.model_config, parts.model_name
        self.topology, self.executor, self.cost_model = parts.topology, parts.executor, parts.cost_model
        self.compilation_cache_dir = parts.compilation_cache_dir
        self.deterministic = engine_config.deterministic
        self.progress = engine_config.progress
        self._request_ids = itertools.count()
        self.engine: Engine | None = None
        self.set_policy(engine_config.policy, engine_config.prefill_degree, engine_config.decode_degree,
                        engine_config.policy_options, warmup=engine_config.warmup)

    # -- configuration ----------------------------------------------------------------------------------------
    def set_policy(self, policy: str = "esp", prefill_degree: int | None = None, decode_degree: int | None = None,
                   policy_options: dict | None = None, warmup: bool = True) -> None:
        """Switch the scheduling policy (between generate calls); compiled programs are kept."""
        if self.engine is not None:
            if self.engine.num_unfinished:
                raise RuntimeError("cannot switch policy while requests are running")
            self._drain()  # steps planned behind the last stops may still run (asynchronous scheduling)
        self.engine = build_engine(self._parts, policy, prefill_degree, decode_degree, policy_options)
        if warmup:
            self.warm_up()

    def warm_up(self) -> None:
        """Compile the programs this policy runs most, ahead of time (with a progress bar)."""
        prefill_groups, decode_groups = self.engine.policy.warmup_groups(self.topology.num_instances)
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

    def snapshot(self) -> EngineSnapshot:
        """The engine's state at this instant (queues, KV pages, DoPs, programs, token limits)."""
        return self.engine.snapshot()

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

