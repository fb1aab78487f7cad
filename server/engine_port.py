"""The engine as the server sees it: the one module that knows `AsyncLLM`'s insides.

Data flow:
  1. `EnginePort.create(**llm_kwargs)` returns at once; `await port.load()` builds the `AsyncLLM`
     (weights, KV pools, ahead-of-time compilation) in a worker thread, so the server can listen —
     and answer health checks with NOT_SERVING — while the model loads and warms up; then it logs
     the engine's start-up summary (`LLM.describe()`).
     `EnginePort.wrap(async_llm)` serves an engine that already exists (tests share one engine
     between several servers).
  2. Requests: `generate(token_ids, params, request_id)` is `AsyncLLM.generate`; leaving it early
     aborts the request (pages freed within one step); `abort(request_id)` returns once pages are free;
     `is_scheduled(request_id)` says whether the engine has begun it (the server's waiting queue).
  3. Lifecycle: `is_ready` / `wait_ready` (engine built and warmed up), `dead_reason` / `wait_dead`
     (the engine thread died, or loading failed).
  4. Introspection reads only `AsyncLLM`'s public face: its `snapshot()` (the engine's state at one
     instant, taken without stopping the engine thread) feeds `metrics_snapshot()` for Prometheus,
     `server_info()` for GetServerInfo and `token_limits()` for admission; `describe()` (the set-up,
     read once), `tokenizer` and `model_config` feed `model_info()` (the model's name, never its path on
     this disk). `longest_token_bytes` (computed once) bounds how many bytes one token can stand for.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from loong_jax.entrypoints.async_llm import AsyncLLM, EngineDeadError
from loong_jax.entrypoints.llm import format_description
from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.engine.snapshot import EngineSnapshot, TokenLimits

logger = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "EnginePort"]
DEATH_POLL_S = 0.1


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loong-jax")
    except PackageNotFoundError:
        return "unknown"


class EnginePort:
    def __init__(self, loader: Callable[[], AsyncLLM] | None = None, *, engine: AsyncLLM | None = None,
                 model_path: str | Path | None = None, owns_engine: bool = True):
        if (loader is None) == (engine is None):
            raise ValueError("an EnginePort needs exactly one of loader or engine")
        self._loader = loader
        self._engine = engine
        self._owns_engine = owns_engine
        self._model_path = None if model_path is None else Path(model_path)
        self._load_error: str | None = None
        self._longest_token_bytes: int | None = None
        self._description: dict | None = None  # the engine's set-up: fixed once it is built
        self._version = _package_version()

    @classmethod
    def create(cls, **llm_kwargs: Any) -> "EnginePort":
        """A port whose AsyncLLM(**llm_kwargs) is built by `load()`."""
        from loong_jax.models.demo import resolve_model_path

        model_path = resolve_model_path(llm_kwargs.get("model"))  # a wrong folder fails now, not later
        llm_kwargs = {**llm_kwargs, "model": str(model_path)}
        llm_kwargs.setdefault("progress", False)  # the server logs instead of drawing progress bars
        return cls(lambda: AsyncLLM(**llm_kwargs), model_path=model_path)

    @classmethod
    def wrap(cls, engine: AsyncLLM, model_path: str | Path | None = None) -> "EnginePort":
        """A port over an engine someone else built (and will shut down)."""
        return cls(engine=engine, model_path=model_path, owns_engine=False)

    # ------------------------------------------------------------------ lifecycle
    async def load(self) -> None:
        """Builds the engine (if this port has a loader); a failure makes the port dead, not the server."""
        if self._engine is not None or self._load_error is not None:
            return
        try:
            self._engine = await asyncio.to_thread(self._loader)
        except Exception as error:  # reported through health and logs; the process decides what to do
            logger.exception("engine failed to load")
            self._load_error = f"loading failed: {type(error).__name__}: {error}"
            return
        description = self.description()  # the start-up summary: what this server runs on
        logger.info("engine: %s", format_description(description),
                    extra={"fields": {"event": "engine_loaded", **description}})

    def is_ready(self) -> bool:
        return self._engine is not None and self.dead_reason() is None

    async def wait_ready(self) -> None:
        await self.load()
        if self._engine is None:
            await asyncio.Event().wait()  # never ready: the death watcher reports the load error

    def dead_reason(self) -> str | None:
        if self._load_error is not None:
            return self._load_error
        error = None if self._engine is None else self._engine.dead_error
        return None if error is None else f"{type(error).__name__}: {error}"

    def death_is_unavailable(self) -> bool:
        """Whether open calls should end UNAVAILABLE rather than INTERNAL: over several processes a dead
        engine means a lost process (the cluster is down; a client may retry on another)."""
        config = getattr(getattr(self._engine, "llm", None), "engine_config", None)
        return getattr(config, "cluster", None) is not None

    async def wait_dead(self) -> str:
        # AsyncLLM reports death by a flag only; a 0.1 s poll is cheap and bounds the delay.
        while (reason := self.dead_reason()) is None:
            await asyncio.sleep(DEATH_POLL_S)
        return reason

    async def close(self) -> None:
        if self._owns_engine and self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown)

    # ------------------------------------------------------------------ requests
    @property
    def engine(self) -> AsyncLLM:
        if self._engine is None:
            raise RuntimeError("the engine is not loaded yet")
        return self._engine

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(list(prompt_token_ids), params, request_id)

    async def abort(self, request_id: str) -> bool:
        if self.dead_reason() is not None:
            return False
        return await self.engine.abort(request_id)

    def is_scheduled(self, request_id: str) -> bool:
        """The engine has begun this request (False while it waits in the queue or is not posted yet)."""
        return self.engine.is_scheduled(request_id)

    # ------------------------------------------------------------------ model facts
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.model_config

    def description(self) -> dict:
        """The engine's set-up (`LLM.describe`: model, devices, instances x tp, policy, KV pages, ...)."""
        if self._description is None:
            self._description = self.engine.describe()
        return self._description

    @property
    def context_length(self) -> int:
        return self.config.max_context

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes any vocabulary entry is spelled with. A token's spelling is never shorter
        than the text it stands for (byte-level BPE spells one byte as one or two bytes, SentencePiece
        spells a space as the 3-byte "\u2581", byte fallback as "<0xAB>"), so a text of B bytes is at
        least B / longest_token_bytes tokens: a bound that rejects a huge prompt before tokenizing it.
        Assumes the tokenizer's normalizer does not delete text (none of the byte-level or SentencePiece
        ones do)."""
        if self._longest_token_bytes is None:
            tokenizer = self.tokenizer
            spellings = (tokenizer.id_to_token(token_id) for token_id in range(tokenizer.vocab_size))
            self._longest_token_bytes = max(len(spelling.encode()) for spelling in spellings if spelling)
        return self._longest_token_bytes

    def token_limits(self) -> TokenLimits:
        """(longest prompt, largest prompt + max_tokens - 1) that can ever fit this cluster's KV."""
        return self.engine.snapshot().token_limits

    def model_info(self, max_prompt_tokens: int) -> pb.ModelInfo:
        config, tokenizer = self.config, self.tokenizer
        architecture = ""
        if self._model_path is not None and (self._model_path / "config.json").exists():
            architectures = json.loads((self._model_path / "config.json").read_text()).get("architectures") or []
            architecture = architectures[0] if architectures else ""
        specials = tokenizer.special_tokens
        special_tokens = pb.SpecialTokens(eos_token_ids=list(tokenizer.eos_token_ids))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if specials.get(key) is not None:
                setattr(special_tokens, key, specials[key])
        if tokenizer.bos_token_id is not None:
            special_tokens.bos_token_id = tokenizer.bos_token_id
        if tokenizer.pad_token_id is not None:
            special_tokens.pad_token_id = tokenizer.pad_token_id
        return pb.ModelInfo(
            model=self.model_name(), architecture=architecture, model_type=config.model_type,
            context_length=self.context_length, max_prompt_tokens=max_prompt_tokens,
            vocab_size=config.vocab_size, num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, dtype=config.dtype,
            special_tokens=special_tokens, has_chat_template=tokenizer.chat_template is not None)

    def model_name(self) -> str:
        """What clients see: "demo" for the shipped model, else the checkpoint folder's name (the full path
        would tell every client how this server's disk is laid out)."""
        from loong_jax.models.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

        if self._model_path is None:
            return ""
        if self._model_path.resolve() == DEMO_MODEL_DIR.resolve():
            return DEMO_MODEL_NAME
        return self._model_path.resolve().name

    # ------------------------------------------------------------------ live state
    def metrics_snapshot(self) -> EngineSnapshot:
        return EngineSnapshot() if self._engine is None else self._engine.snapshot()

    def server_info(self) -> pb.ServerInfo:
        info = pb.ServerInfo(version=self._version)
        if self._engine is None:
            return info
        snapshot = self._engine.snapshot()
        info.num_instances = snapshot.num_instances
        info.tp = self.description()["tp"]
        info.page_size = snapshot.page_size
        info.instances.extend(pb.InstanceInfo(index=i, kv_pages_total=total, kv_pages_used=used,
                                              kv_pages_free=total - used, kv_pages_cached=cached)
                              for i, (total, used, cached) in enumerate(zip(
                                  snapshot.kv_pages_total, snapshot.kv_pages_used, snapshot.kv_pages_cached)))
        info.prefix_cache.CopyFrom(pb.PrefixCacheInfo(
            queries=snapshot.prefix_cache_queries, hits=snapshot.prefix_cache_hits,
            query_tokens=snapshot.prefix_cache_query_tokens, hit_tokens=snapshot.prefix_cache_hit_tokens,
            token_hit_rate=snapshot.prefix_cache_hit_rate))
        info.programs_ready = snapshot.programs_ready
        info.queue_length = snapshot.waiting
        info.queued_tokens = snapshot.queued_tokens
        info.running = snapshot.running
        info.policy = snapshot.policy
        return info

    def pages_used(self) -> int:
        """KV pages in use over all instances (0 when every request has released its pages)."""
        return sum(self._engine.snapshot().kv_pages_used) if self._engine is not None else 0
