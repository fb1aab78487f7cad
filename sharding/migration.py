"""Migration: moving KV pages between members of a group with a collective permute.

This is the only way KV ever moves (ESP mechanism 4, docs/ARCHITECTURE.md): the scheduler
frees an instance by sending its pages to another one.

Data flow:
  1. Host: `layout_migration` turns page transfers (source member -> destination
     member, which pages, where they land) into a static partial permutation
     `moves` and per-member arrays `send_pages` / `receive_pages` [d, n], padded
     with -1 up to the bucket n.
  2. Device (`migrate_pages`, inside `jax.shard_map`): every member gathers its
     send pages across all layers and both k and v, `jax.lax.ppermute` carries
     them along `moves`, and each destination writes what it received at its
     receive pages. Padding entries (-1) are dropped by a scatter with
     mode="drop"; members outside `moves` receive zeros and write nothing.
  3. `loong_jax.executor.programs.migration_program` jits it (token slots for
     the engine, whole pages for `layout_migration`'s plans); it donates the
     pool, so pages are written in place. The host then updates its page
     tables and may reuse the source pages at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from loong_jax.sharding.specs import BY_MEMBER_SPEC, POOL_SPEC
from loong_jax.sharding.topology import SEQ

Moves = tuple[tuple[int, int], ...]  # (source member, destination member) pairs


@dataclasses.dataclass(frozen=True)
class PageTransfer:
    """Pages of `source` that go to `destination`, landing at `destination_pages` (same order)."""

    source: int
    destination: int
    source_pages: Sequence[int]
    destination_pages: Sequence[int]


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
    moves: Moves  # static: part of the compiled program's key
    send_pages: np.ndarray  # [d, n] int32, -1 = padding
    receive_pages: np.ndarray  # [d, n] int32, -1 = padding

    def to_device(self, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
        """(send_pages, receive_pages) on the group mesh, as the migration program takes them."""
        return jax.device_put((self.send_pages, self.receive_pages), NamedSharding(mesh, BY_MEMBER_SPEC))


def layout_migration(transfers: Sequence[PageTransfer], members: int, max_pages: int) -> MigrationPlan:
    """Host side: transfers -> static moves and padded page lists. Each member sends
    to at most one member and receives from at most one (a partial permutation)."""
    send_pages = np.full((members, max_pages), -1, np.int32)
    receive_pages = np.full((members, max_pages), -1, np.int32)
    sources, destinations = set(), set()
    for transfer in transfers:
        count = len(transfer.source_pages)
        if count != len(transfer.destination_pages):
            raise ValueError("a transfer needs as many destination pages as source pages")
        if count > max_pages:
            raise ValueError(f"transfer of {count} pages exceeds the bucket of {max_pages}")
        if transfer.source == transfer.destination:
            raise ValueError(f"member {transfer.source} cannot send pages to itself")
        if transfer.source in sources or transfer.destination in destinations:
            raise ValueError("each member sends to at most one member and receives from at most one")
        for member in (transfer.source, transfer.destination):
            if not 0 <= member < members:
                raise ValueError(f"member {member} is not in a group of {members}")
        sources.add(transfer.source)
        destinations.add(transfer.destination)
        send_pages[transfer.source, :count] = transfer.source_pages
        receive_pages[transfer.destination, :count] = transfer.destination_pages
    moves = tuple(sorted((t.source, t.destination) for t in transfers))
    return MigrationPlan(moves, send_pages, receive_pages)


def _member_migrate(pool, send_pages, receive_pages, *, moves: Moves):
    """pool: [1, layers, 2, pages, page_size, kvh_local, hd]; send/receive_pages: [1, n]."""
    member_pool = pool[0]  # [layers, 2, pages, page_size, kvh, hd]
    num_pages = member_pool.shape[2]
    outgoing = member_pool[:, :, jnp.clip(send_pages[0], 0, num_pages - 1)]  # [layers, 2, n, ps, kvh, hd]
    incoming = jax.lax.ppermute(outgoing, SEQ, perm=moves)
    # Negative indices would wrap around; send padding past the end so it is dropped.
    targets = jnp.where(receive_pages[0] >= 0, receive_pages[0], num_pages)  # [n]
    member_pool = member_pool.at[:, :, targets].set(incoming, mode="drop")
    return member_pool[None]


def migrate_pages(pool: jax.Array, send_pages: jax.Array, receive_pages: jax.Array, *, mesh: Mesh,
                  moves: Moves) -> jax.Array:
    """Moves pages between members of the group `mesh` (traceable; see module docstring).

    pool: [d, layers, 2, pages, page_size, kv_heads, head_dim] (POOL_SPEC);
    send_pages, receive_pages: [d, n] int32 (BY_MEMBER_SPEC). Returns the pool.
    """
    if not moves:
        return pool
    return jax.shard_map(
        functools.partial(_member_migrate, moves=moves),
        mesh=mesh,
        in_specs=(POOL_SPEC, BY_MEMBER_SPEC, BY_MEMBER_SPEC),
        out_specs=POOL_SPEC,
    )(pool, send_pages, receive_pages)

