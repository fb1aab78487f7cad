"""Policy `fixed`: one prefill degree and one decode degree for every request, chosen by the user.

This is the simple scheduler of the real engine (and a baseline beside ESP): prefill on fixed aligned groups
of `prefill_degree` instances, decode on fixed aligned groups of `decode_degree` instances. The two degrees
may differ, which exercises both elastic moves deterministically:
  - prefill_degree > decode_degree: the ring prefill keeps each prompt's KV only on the members of one decode
    group inside the prefill group (proactive scale-down; the other members leave after the prefill);
  - prefill_degree < decode_degree: the KV stays on the prefill group, and the decode group around it gives
    each request masters with free pages (scale-up onto new masters as requests grow).

Data flow of `schedule(view)`:
  1. Requests whose peak KV (prompt + max_tokens - 1) exceeds one decode group's pool, or whose prompt exceeds
     one prefill group's pool, can never run: they are rejected, never queued forever.
  2. Prefill first (as vLLM does): each idle prefill group takes the head requests of the queue whose prompt
     plus expected growth fits the decode group it will live in (`queue=fifo`, the default: arrival order,
     stopping at the first that does not fit; `queue=deadline`: ESP's order and backfilling, the head's
     prefill group reserved; `esp.queue.QueueDiscipline`). A request's KV is spread evenly (page-aligned)
     over the keeping members; the member holding the last segment is its first master, rotated from
     request to request so that every member of a decode group masters some requests. A request whose
     prompt starts with cached pages (`scheduler.prefix`) prefills only its suffix when its keeping members
     hold the cached prefix; while the idle prefill group holding its prefix is still to be served, other
     groups leave it to that group.
  3. Each idle decode group not taken by a prefill runs one decode step of every request it holds: masters
     keep their slot while they have room, scale up inside the group when full, and the newest request of
     the group is preempted (recompute) when the whole group is out of pages.
Admission is limited by free pages minus the growth reserved for running decodes, so preemption is the
exception and a request never waits on one that waits on it (no deadlock).
"""

from __future__ import annotations

from loong_jax.scheduler.baselines.static import (
    ceil_div, fixed_groups, growth_tokens, peak_tokens, plan_group_decodes, reserve_for_decodes, spread_tokens,
)
from loong_jax.scheduler.cost.estimates import prefill_chunks_seconds
from loong_jax.scheduler.esp.queue import QueueDiscipline
from loong_jax.scheduler.plan import Plan, PrefillBatch
from loong_jax.scheduler.prefix import charge_pins, prefill_chunk, prefix_home, reusable, waits_for_prefix
from loong_jax.scheduler.policy import PolicyDefaults
from loong_jax.scheduler.view import RequestView, SchedulerView


class FixedPolicy(PolicyDefaults):
    name = "fixed"

    def __init__(self, prefill_degree: int | None = None, decode_degree: int | None = None,
                 growth_horizon: int = 512, max_admit: int = 256, queue: str = "fifo", slo_scale: float = 25.0,
                 admission: bool | str = False):
        for label, degree in (("prefill_degree", prefill_degree), ("decode_degree", decode_degree)):
            if degree is not None and (degree < 1 or degree & (degree - 1)):
                raise ValueError(f"{label} must be a power of two >= 1, got {degree}")
        if growth_horizon < 0 or max_admit < 1:
            raise ValueError("growth_horizon must be >= 0 and max_admit >= 1")
        self.prefill_degree = prefill_degree
        self.decode_degree = decode_degree
        self.growth_horizon = growth_horizon
        self.max_admit = max_admit
        self._rotation = 0  # which member of a keeping group masters the next admitted request
        self.queue = QueueDiscipline(queue, slo_scale, admission=admission)

    @classmethod
    def degree_options(cls, prefill_degree: int | None, decode_degree: int | None) -> dict:
        return {"prefill_degree": prefill_degree, "decode_degree": decode_degree}

    @classmethod
    def from_degrees(cls, num_instances: int, prefill_degree: int | None = None, decode_degree: int | None = None,
                     options: dict | None = None) -> "FixedPolicy":
        policy = super().from_degrees(num_instances, prefill_degree, decode_degree, options)
        policy.degrees(num_instances)  # fails now, with the reason, if a degree does not divide the cluster
        return policy

    def request_token_limits(self, num_instances: int, pages_per_instance: int, page_size: int) -> tuple[int, int]:
        """(longest prompt, largest peak KV) in tokens these degrees can ever serve."""
        prefill = self.prefill_degree or num_instances
        decode = self.decode_degree or prefill
        keepers = min(prefill, decode)  # members that keep a prompt's KV
        return keepers * pages_per_instance * page_size, decode * pages_per_instance * page_size

    def warmup_groups(self, num_instances: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        return self.groups(num_instances)  # the only groups this policy ever runs programs on

    def degrees(self, num_instances: int) -> tuple[int, int]:
        prefill = self.prefill_degree or num_instances
        decode = self.decode_degree or prefill
        for label, degree in (("prefill_degree", prefill), ("decode_degree", decode)):
            if degree > num_instances or num_instances % degree:
                raise ValueError(f"{label}={degree} must divide the {num_instances} instances")
        return prefill, decode

    def groups(self, num_instances: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """(prefill groups, decode groups): the only groups this policy ever runs programs on."""
        prefill, decode = self.degrees(num_instances)
        return fixed_groups(num_instances, prefill), fixed_groups(num_instances, decode)

    def schedule(self, view: SchedulerView) -> Plan:
        prefill_groups, decode_groups = self.groups(view.num_instances)
        idle = set(view.idle_instances)
        pages_free = [i.pages_free for i in view.instances]
        reserve = reserve_for_decodes(view, self.growth_horizon)
        rejections, waiting = self._split_never_fitting(view)
        waiting = [r for r in waiting if not waits_for_prefix(r, view)]  # its cached prefix frees soon
        waiting, reserved, refused = self.queue.fixed_layout_queue(view, waiting, self.growth_horizon, prefill_groups, idle)

        prefills, used = [], set()
        for group in prefill_groups:
            if not idle.issuperset(group) or group == reserved:
                continue
            later = [g for g in prefill_groups if g != group and g != reserved and idle.issuperset(g)
                     and not used.intersection(g)]
            batch = self._prefill(view, group, decode_groups, waiting, pages_free, reserve, later)
            if batch is not None:
                prefills.append(batch)
                used.update(group)
                taken = set(batch.request_ids)
                waiting = [r for r in waiting if r.request_id not in taken]

        decodes, preemptions = [], []
        for group in decode_groups:
            if not idle.issuperset(group) or used.intersection(group):
                continue
            members = set(group)
            requests = [r for r in view.decoding if not r.in_flight and members.issuperset(r.kv)]
            plan_group_decodes(view, group, requests, pages_free, decodes, preemptions)
        return Plan(prefills=tuple(prefills), decodes=tuple(decodes), preemptions=tuple(preemptions),
                    rejections=rejections + refused)

    def _split_never_fitting(self, view: SchedulerView) -> tuple[tuple, list[RequestView]]:
        pages = min(i.pages_total for i in view.instances)
        max_prompt, max_peak = self.request_token_limits(view.num_instances, pages, view.page_size)
        rejected, kept = [], []
        for request in view.waiting:
            fits = request.prefill_target <= max_prompt and peak_tokens(request) <= max_peak
            (kept if fits else rejected).append(request)
        return tuple(r.request_id for r in rejected), kept

    def _keepers(self, group: tuple[int, ...], decode_groups, usable: list[int], request) -> tuple[int, ...]:
        """Members of prefill `group` that keep a prompt's KV: the decode group inside it that holds the
        request's cached prefix, else the one with the most usable pages (scale-down), or the whole prefill
        group when decode groups are larger."""
        inside = [g for g in decode_groups if set(g) <= set(group)]
        if not inside:
            return group
        return prefix_home(request, inside) or max(inside, key=lambda g: (sum(usable[i] for i in g), -g[0]))

    def _prefill(self, view: SchedulerView, group, decode_groups, waiting, pages_free, reserve, later=()):
        """The queue's head requests whose prompt and expected growth fit their keeping members now (a
        request whose cached prefix lives in one of the `later` idle prefill groups is left to it)."""
        usable = [max(0, pages_free[i] - reserve[i]) for i in range(view.num_instances)]
        chosen, chunks, placements, pinned = [], [], [], list(pages_free)

        def place(request) -> bool:
            nonlocal usable
            keepers = self._keepers(group, decode_groups, usable, request)
            if not reusable(request, keepers) and prefix_home(request, later) is not None:
                return False
            growth = growth_tokens(view, request, self.growth_horizon)
            shift = self._rotation % len(keepers)
            ordered = keepers[shift + 1:] + keepers[:shift + 1]  # the last member becomes the master
            trial = list(usable)
            start, length = prefill_chunk(request, keepers)
            if start and not charge_pins(request, trial):
                return False
            segments = spread_tokens(length, ordered, trial, view.page_size, keep_free=growth)
            if segments is None:
                return False
            trial[segments[-1][0]] -= ceil_div(max(0, growth - (-segments[-1][1]) % view.page_size), view.page_size)
            if trial[segments[-1][0]] < 0:
                return False
            if start:
                charge_pins(request, pinned)  # pinned >= usable everywhere: it fits there too
            usable = trial
            self._rotation += 1
            chosen.append(request)
            chunks.append((start, length))
            placements.append(segments)
            return True

        self.queue.admit(waiting[: self.max_admit], place)
        if not chosen:
            return None
        pages_free[:] = pinned
        for segments in placements:
            for instance, n_tokens in segments:
                pages_free[instance] -= ceil_div(n_tokens, view.page_size)
        chunks = tuple(chunks)
        estimate = prefill_chunks_seconds(view.cost_model, len(group), chunks)
        kind = "prefill_context" if any(start for start, _ in chunks) else "prefill"
        estimate += view.compile_penalty_s(kind, group, sum(length for _, length in chunks))
        return PrefillBatch(tuple(group), tuple(r.request_id for r in chosen), chunks, tuple(placements),
                            estimated_s=estimate)
