"""Scheduling for elastic sequence parallelism: plans, the policy view, policies, the cost model.

Nothing in this package imports JAX: the scheduler sees instances as numbers and returns a `Plan`.
"""

from loong_jax.scheduler.plan import (
    DecodeBatch, Migration, MigrationBatch, Plan, Preemption, PrefillBatch, WorkUnit,
)
from loong_jax.scheduler.policy import DEFAULT_POLICY, Policy, make_policy, policy_names
from loong_jax.scheduler.view import InstanceView, RequestView, SchedulerView

__all__ = [
    "DEFAULT_POLICY", "DecodeBatch", "InstanceView", "Migration", "MigrationBatch", "Plan", "Policy",
    "Preemption", "PrefillBatch", "RequestView", "SchedulerView", "WorkUnit", "make_policy", "policy_names",
]
