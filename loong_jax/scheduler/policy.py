"""Scheduling policies: the `Policy` protocol and the registry of policies by name.

Data flow:
  1. `build_policy(name, num_instances, prefill_degree, decode_degree, options)` looks the class up by
     name and lets it read the command line's degrees itself (`from_degrees`): each policy validates its
     own options, so nothing outside the scheduler checks policy names or types. `make_policy(name,
     **options)` builds one from its own keyword arguments (`esp` is the default; baselines: `static-sp`,
     `replicas`, `chunked-prefill`, `pd-disagg`, `fixed`). `PolicySpec.parse("replicas:queue=deadline")` reads
     the `name:key=value` form every command line uses (`serve --policy`, `simulate --policies`).
  2. Before serving, the engine asks the policy what it can ever hold (`request_token_limits`) and which
     groups it runs most (`warmup_groups`, compiled ahead of time).
  3. Each step the engine calls `policy.schedule(view)` with a `SchedulerView` and gets a `Plan` for its idle
     instances. Every policy uses the same plan vocabulary, the same `EngineState`, the same KV capacity and
     the same cost model, so they can be swapped on the real engine and in the simulator.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from loong_jax.scheduler.groups import Group
from loong_jax.scheduler.plan import Plan
from loong_jax.scheduler.view import SchedulerView

if TYPE_CHECKING:  # the queue module imports the ESP snapshot: not at registry import time
    from loong_jax.scheduler.esp.queue import QueueDiscipline

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
    late_requests: int  # waiting requests held behind every timely one at the last step (a server metric)

    @classmethod
    def from_degrees(cls, num_instances: int, prefill_degree: int | None = None, decode_degree: int | None = None,
                     options: dict | None = None) -> "Policy":
        """The policy for `num_instances` instances from the command line's degrees and its own options;
        ValueError when a degree does not apply to it or does not fit the cluster."""
        ...

    def schedule(self, view: SchedulerView) -> Plan:
        """Decide the work for the idle instances of `view` (may return an empty plan)."""
        ...

    def request_token_limits(self, num_instances: int, pages_per_instance: int,
                             page_size: int) -> tuple[int, int] | None:
        """(longest prompt, largest peak KV) in tokens one request can ever get; None = the whole cluster."""
        ...

    def warmup_groups(self, num_instances: int) -> tuple[list[Group], list[Group]]:
        """(prefill groups, decode groups) this policy runs most: their programs are compiled ahead of time."""
        ...


def degrees_do_not_apply(name: str, prefill_degree: int | None, decode_degree: int | None) -> None:
    """ValueError when degrees are given to a policy that chooses its own."""
    if prefill_degree is not None or decode_degree is not None:
        raise ValueError(f"prefill_degree / decode_degree apply to policy 'fixed' (or one degree to 'static-sp' "
                         f"and 'chunked-prefill'), not {name!r}")


class PolicyDefaults:
    """What an elastic policy answers (ESP, pd-disagg): it picks degrees itself, may spread one request
    over the whole cluster, and is warmed up on whole-cluster prefill and single-instance decode (other
    groups compile on demand). Fixed-degree policies override these."""

    name: str
    queue: QueueDiscipline  # the options `queue=fifo|deadline` and `admission=on|off` of every policy

    @property
    def late_requests(self) -> int:
        return self.queue.late_requests

    @classmethod
    def from_degrees(cls, num_instances: int, prefill_degree: int | None = None, decode_degree: int | None = None,
                     options: dict | None = None):
        return cls(**cls.degree_options(prefill_degree, decode_degree), **dict(options or {}))

    @classmethod
    def degree_options(cls, prefill_degree: int | None, decode_degree: int | None) -> dict:
        """The constructor arguments the command line's degrees stand for (none here)."""
        degrees_do_not_apply(cls.name, prefill_degree, decode_degree)
        return {}

    def request_token_limits(self, num_instances: int, pages_per_instance: int,
                             page_size: int) -> tuple[int, int] | None:
        return None

    def warmup_groups(self, num_instances: int) -> tuple[list[Group], list[Group]]:
        return [tuple(range(num_instances))], [(i,) for i in range(num_instances)]


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICY_CLASSES)


def policy_class(name: str) -> type:
    try:
        module_name, class_name = _POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_POLICY_CLASSES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def policy_options(name: str) -> tuple[str, ...]:
    """The option names policy `name` takes (its constructor's keyword arguments)."""
    parameters = inspect.signature(policy_class(name).__init__).parameters
    return tuple(p for p in parameters if p != "self")


def check_option_names(name: str, options: dict) -> None:
    """ValueError naming the policy's options when `options` holds one it does not take."""
    known = policy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"policy {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known)}")


def make_policy(name: str = DEFAULT_POLICY, **options) -> Policy:
    """Build a policy by name; options are the policy's own keyword arguments (e.g. `degree=4`,
    `queue=deadline`)."""
    check_option_names(name, options)
    return policy_class(name)(**options)


def build_policy(name: str, num_instances: int, prefill_degree: int | None = None, decode_degree: int | None = None,
                 options: dict | None = None) -> Policy:
    """A policy by name for `num_instances` instances; the degrees apply to `fixed` (and one degree to
    `static-sp` and `chunked-prefill`), each policy checks its own (`Policy.from_degrees`)."""
    check_option_names(name, dict(options or {}))
    return policy_class(name).from_degrees(num_instances, prefill_degree, decode_degree, options)


@dataclass(frozen=True)
class PolicySpec:
    """A policy name plus constructor options, written `name` or `name:key=value:key=value`."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.options])

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        """`esp`, `replicas:queue=deadline`, `esp:admission=on:scale_up=0`; an unknown name is a ValueError
        (unknown options are refused by the policy when it is built)."""
        name, *pairs = text.strip().split(":")
        if name not in _POLICY_CLASSES:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_POLICY_CLASSES)}")
        options = []
        for pair in pairs:
            key, separator, value = pair.partition("=")
            if not separator or not key:
                raise ValueError(f"policy option {pair!r} in {text!r} is not key=value")
            options.append((key, _parse_value(value)))
        return cls(name, tuple(options))

    def build(self):
        return make_policy(self.name, **dict(self.options))


def _parse_value(value: str) -> object:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)
