"""Host-side layout of a packed prefill batch over the d members of a group,
and the KV placement (proactive scale-down) expressed in that layout.

Data flow (all numpy, no JAX):
  1. The prompts of a batch are packed into one *stream* (prompt 0's tokens,
     then prompt 1's, ...). Every stream token has a segment id (its prompt)
     and a global position (its index in the prompt).
  2. A member assignment says which member computes each stream token:
     `striped_members` (token j of a prompt -> member j mod d; balances causal
     work) or `contiguous_members` (the stream cut into d equal runs).
  3. `build_layout` gathers each member's tokens, in stream order, into rows
     [m * rows_per_member, (m + 1) * rows_per_member) of every per-token array,
     padding with segment id -1. `rows_per_member` is the shape bucket: the
     same bucket gives the same shapes, hence the same compiled program.
  4. A placement says which member keeps each token's KV and in which flat
     slot of its pool: `keep_round_robin` picks the members,
     `place_densely` stores each member's kept tokens of a request densely in
     its pages (the i-th kept token at page_table[i // page_size]).
  5. `layout.to_rows` / `layout.to_stream` move any per-token array between
     stream order and row order; `layout.last_token_rows` gives the rows to
     score for sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def prompt_offsets(lengths: Sequence[int]) -> np.ndarray:
    """[n + 1] start of each prompt in the stream (and the total at the end)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths < 1).any():
        raise ValueError(f"prompt lengths must be a list of positive ints, got {lengths.tolist()}")
    return np.concatenate([[0], np.cumsum(lengths)])


def stream_positions(lengths: Sequence[int]) -> np.ndarray:
    """[total] position of each stream token inside its prompt."""
    offsets = prompt_offsets(lengths)
    return (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)).astype(np.int32)


def stream_segments(lengths: Sequence[int]) -> np.ndarray:
    """[total] prompt index of each stream token."""
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def striped_members(lengths: Sequence[int], members: int) -> np.ndarray:
    """[total] member computing each token: token j of a prompt on member j mod d."""
    return (stream_positions(lengths) % members).astype(np.int32)


def contiguous_members(lengths: Sequence[int], members: int) -> np.ndarray:
    """[total] member computing each token: the stream cut into d equal runs
    (plain sequence parallelism, for comparison)."""
    total = int(prompt_offsets(lengths)[-1])
    return (np.arange(total) * members // total).astype(np.int32)


def rows_needed(token_members: np.ndarray, members: int) -> int:
    """Smallest rows_per_member that holds this assignment."""
    return int(np.bincount(token_members, minlength=members).max())


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each stream token sits in the row order of a group program."""

    members: int
    rows_per_member: int
    stream_index: np.ndarray  # [members * rows_per_member] int32, stream token of each row, -1 = padding
    row_of_token: np.ndarray  # [total] int32, row of each stream token (the inverse map)
    positions: np.ndarray  # [members * rows_per_member] int32, global position (0 on padding)
    segment_ids: np.ndarray  # [members * rows_per_member] int32, prompt index, -1 = padding
    last_token_index: np.ndarray  # [n] int32, stream index of each prompt's last token

    @property
    def num_rows(self) -> int:
        return self.members * self.rows_per_member

    def to_rows(self, per_token: np.ndarray, fill=0) -> np.ndarray:
        """Stream-order array [total, ...] -> row order [rows, ...], padding rows = fill."""
        per_token = np.asarray(per_token)
        rows = np.full((self.num_rows,) + per_token.shape[1:], fill, dtype=per_token.dtype)
        rows[self.row_of_token] = per_token
        return rows

    def to_stream(self, per_row: np.ndarray) -> np.ndarray:
        """Row-order array [rows, ...] -> stream order [total, ...]."""
        return np.asarray(per_row)[self.row_of_token]

    def last_token_rows(self) -> np.ndarray:
        """[n] int32 row of each prompt's last token (the rows to sample from)."""
        return self.row_of_token[self.last_token_index]


def build_layout(lengths: Sequence[int], token_members: np.ndarray, members: int,
                 rows_per_member: int | None = None) -> PackedLayout:
    """Rows of member m = its tokens in stream order, then padding."""
    token_members = np.asarray(token_members, dtype=np.int64)
    total = int(prompt_offsets(lengths)[-1])
    if token_members.shape != (total,) or (token_members < 0).any() or (token_members >= members).any():
        raise ValueError(f"token_members must give a member in [0, {members}) for each of {total} tokens")
    needed = rows_needed(token_members, members)
    rows_per_member = needed if rows_per_member is None else rows_per_member
    if rows_per_member < needed:
        raise ValueError(f"rows_per_member={rows_per_member} is too small: a member needs {needed} rows")
    # Stable sort by member keeps stream order inside each member.
    order = np.argsort(token_members, kind="stable")
    rank_in_member = np.arange(total) - np.searchsorted(token_members[order], token_members[order])
    row_of_token = np.empty(total, dtype=np.int32)
    row_of_token[order] = token_members[order] * rows_per_member + rank_in_member
    stream_index = np.full(members * rows_per_member, -1, dtype=np.int32)
    stream_index[row_of_token] = np.arange(total, dtype=np.int32)
    layout = PackedLayout(
        members=members, rows_per_member=rows_per_member, stream_index=stream_index,
        row_of_token=row_of_token, positions=np.zeros(0, np.int32), segment_ids=np.zeros(0, np.int32),
        last_token_index=(prompt_offsets(lengths)[1:] - 1).astype(np.int32))
    return dataclasses.replace(
        layout, positions=layout.to_rows(stream_positions(lengths), fill=0),
        segment_ids=layout.to_rows(stream_segments(lengths), fill=-1))


def striped_layout(lengths: Sequence[int], members: int, rows_per_member: int | None = None) -> PackedLayout:
    return build_layout(lengths, striped_members(lengths, members), members, rows_per_member)


# ---------------------------------------------------------------- placement
@dataclasses.dataclass(frozen=True)
class Placement:
    """Which member keeps each stream token's KV, and where in its pool."""

    member: np.ndarray  # [total] int32 group member, -1 = kept nowhere
    slot: np.ndarray  # [total] int32 flat slot (page * page_size + offset) in that member's pool

    def rows(self, layout: PackedLayout) -> tuple[np.ndarray, np.ndarray]:
        """(placement_member, placement_slot) in row order; padding rows kept nowhere."""
        return layout.to_rows(self.member, fill=-1), layout.to_rows(self.slot, fill=0)


def keep_round_robin(lengths: Sequence[int], keepers: Sequence[Sequence[int]]) -> np.ndarray:
    """[total] keeping member of each token: token j of prompt r on
    keepers[r][j mod len(keepers[r])]. keepers[r] = all members in order keeps
    a striped prompt's KV where it was computed; a single member gathers the
    whole prompt there (the group scales down to it after the prefill)."""
    if len(keepers) != len(lengths):
        raise ValueError(f"{len(lengths)} prompts but {len(keepers)} keeper lists")
    positions = stream_positions(lengths)
    segments = stream_segments(lengths)
    keep_table = [np.asarray(k, dtype=np.int32) for k in keepers]
    if any(len(k) == 0 for k in keep_table):
        raise ValueError("every prompt needs at least one keeping member")
    return np.array([keep_table[r][j % len(keep_table[r])] for r, j in zip(segments, positions)],
                    dtype=np.int32)


def place_densely(lengths: Sequence[int], keep_member: np.ndarray,
                  page_tables: Sequence[Sequence[Sequence[int]]], page_size: int,
                  held_before: np.ndarray | None = None) -> Placement:
    """Flat slots for the kept tokens: the i-th token of request r kept on
    member m goes to member m's dense position k = held_before[m][r] + i, i.e.
    page_tables[m][r][k // page_size] * page_size + k % page_size.

    page_tables[m][r]: pages of member m's pool for request r, in order (for a
    chunk of a longer prompt: old and new pages); held_before: [members,
    requests] tokens of r that m already held (a chunk continues after them;
    default none).
    """
    keep_member = np.asarray(keep_member, dtype=np.int32)
    segments = stream_segments(lengths)
    members, requests = len(page_tables), len(lengths)
    counts = (np.zeros((members, requests), dtype=np.int64) if held_before is None
              else np.array(held_before, dtype=np.int64))  # [members, requests]: next dense index
    slots = np.zeros(len(keep_member), dtype=np.int32)
    for token, (member, request) in enumerate(zip(keep_member, segments)):
        if member < 0:
            continue
        index = counts[member, request]
        pages = page_tables[member][request]
        if index // page_size >= len(pages):
            raise ValueError(f"member {member} has {len(pages)} pages for request {request}, "
                             f"too few for {index + 1} tokens")
        slots[token] = pages[index // page_size] * page_size + index % page_size
        counts[member, request] = index + 1
    return Placement(member=keep_member, slot=slots)
