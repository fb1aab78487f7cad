"""Scheduling policies: the `Policy` protocol and the registry of policies by name.

Data flow:
  1. `make_policy(name, **options)` builds a policy (`esp` is the default; baselines: `static-sp`,
     `replicas`, `chunked-prefill`, `pd-disagg`).
  2. Each step the engine calls `policy.schedule(view)` with a `SchedulerView` and gets a `Plan` for its idle
     instances. Every policy uses the same plan vocabulary, the same `EngineState`, the same KV capacity and
     the same cost model, so they can be swapped on the real engine and in the simulator.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from loong_jax.scheduler.plan import Plan
from loong_jax.scheduler.view import SchedulerView

DEFAULT_POLICY = "esp"

# name -> (module, class); imported on first use so that importing the registry stays cheap.
_POLICY_CLASSES = MappingProxyType({
    "esp": ("loong_jax.scheduler.esp.policy", "EspPolicy"),
    "static-sp": ("loong_jax.scheduler.baselines.static", "StaticSpPolicy"),
    "replicas": ("loong_jax.scheduler.baselines.static", "ReplicasPolicy"),
    "chunked-prefill": ("loong_jax.scheduler.baselines.chunked_prefill", "ChunkedPrefillPolicy"),
    "pd-disagg": ("loong_jax.scheduler.baselines.pd_disagg", "PdDisaggPolicy"),
    "fixed": ("loong_jax.scheduler.baselines.fixed", "FixedPolicy"),
})


@runtime_checkable
class Policy(Protocol):
    name: str

    def schedule(self, view: SchedulerView) -> Plan:
        """Decide the work for the idle instances of `view` (may return an empty plan)."""
        ...


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICY_CLASSES)


def policy_class(name: str) -> type:
    try:
        module_name, class_name = _POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_POLICY_CLASSES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def make_policy(name: str = DEFAULT_POLICY, **options) -> Policy:
    """Build a policy by name; options are the policy's own keyword arguments (e.g. `degree=4`)."""
    return policy_class(name)(**options)
