"""Finding stop strings in streamed text, one character at a time.

Data flow:
  1. `StopStringMatcher(stop)` builds an Aho-Corasick automaton over a
     request's stop strings once (it is immutable, so the request's n samples
     share it). A state is an int; `ROOT` is the empty text.
  2. The detokenizer feeds every new character of a sequence's text through
     `feed(state, text)`. The state it returns encodes the longest suffix of
     the text so far that is a prefix of some stop string; its length,
     `hold_back(state)`, is exactly how many trailing characters must not be
     streamed yet because they could still become a stop string.
  3. `feed` reports the first stop string that *completes* in the new text
     (earliest end; the longest one when several end at the same character),
     as if the text had been produced one character at a time. The result is
     therefore the same however the text is split into tokens.

Cost: O(1) amortised per character whatever the number or length of the
stop strings, and memory linear in their total length (bounded by
SamplingParams' limits), so hostile stop lists cannot slow decoding down.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

ROOT = 0


@dataclasses.dataclass(frozen=True)
class StopMatch:
    end: int  # offset in the fed text just after the stop string's last character
    stop: str  # the stop string that completed there


class StopStringMatcher:
    """Aho-Corasick automaton: trie of the stop strings plus failure links."""

    def __init__(self, stop: Sequence[str]):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(stop)
        self._children: list[dict[str, int]] = [{}]
        self._depth: list[int] = [0]
        self._own_stop: list[str | None] = [None]
        for text in self.stop:
            self._insert(text)
        self._fail = [ROOT] * len(self._children)
        # The longest stop string that is a suffix of each node's text (None: no stop ends here).
        self._match: list[str | None] = list(self._own_stop)
        self._link_failures()

    def _insert(self, text: str) -> None:
        node = ROOT
        for char in text:
            child = self._children[node].get(char)
            if child is None:
                child = len(self._children)
                self._children[node][char] = child
                self._children.append({})
                self._depth.append(self._depth[node] + 1)
                self._own_stop.append(None)
            node = child
        if self._own_stop[node] is None:  # first spelling wins; duplicates change nothing
            self._own_stop[node] = text

    def _link_failures(self) -> None:
        # Breadth-first, so a node's failure target (shallower) is final before it is used.
        queue = collections.deque(self._children[ROOT].values())
        while queue:
            node = queue.popleft()
            for char, child in self._children[node].items():
                self._fail[child] = self._next(self._fail[node], char) if node != ROOT else ROOT
                if self._match[child] is None:
                    self._match[child] = self._match[self._fail[child]]
                queue.append(child)

    def _next(self, state: int, char: str) -> int:
        while True:
            child = self._children[state].get(char)
            if child is not None:
                return child
            if state == ROOT:
                return ROOT
            state = self._fail[state]

    @property
    def max_stop_length(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def hold_back(self, state: int) -> int:
        """Characters at the end of the text that could still start a stop string."""
        return self._depth[state]

    def feed(self, state: int, text: str, report: bool = True) -> tuple[int, StopMatch | None]:
        """Advances over `text`; stops at the first completed stop string when `report`.

        Returns the new state and the match (None when no stop string completed,
        or when report=False: then the whole text is consumed and matches are
        ignored, as during min_tokens)."""
        for offset, char in enumerate(text):
            state = self._next(state, char)
            if report and self._match[state] is not None:
                return state, StopMatch(end=offset + 1, stop=self._match[state])
        return state, None
