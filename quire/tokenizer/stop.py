"""Stop strings for one output sequence, matched across arbitrary text deltas."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas.

    ``feed(delta)`` returns ``(text_to_emit, matched_stop)``. Text that could still be the start of a
    stop string is held back until the next deltas settle it; once a stop matches, the text before
    it is emitted (plus the stop itself with ``include_stop_str_in_output``) and everything after
    it is dropped. Call ``flush()`` when the sequence ends for another reason to get the held-back
    text. ``truncated_chars`` then tells how many fed characters were dropped, so a caller holding
    the full decoded text can cut it: ``full_text[: len(full_text) - truncated_chars]``.

    When several stop strings occur, the one that is complete first in the stream wins (the
    smallest end position; on a tie, the longer one). This does not depend on how the text was
    split into deltas. It differs from "the leftmost start" only when one stop string contains
    another: with stops ``["abcd", "bc"]`` and text ``"abcd"``, ``"bc"`` wins and ``"a"`` is emitted.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop))  # dedupe, keep order
        self._include = include_stop_str_in_output
        # Fed text that a stop string completed by a later delta could still start in. Some of it
        # may already be emitted (always, when the stop is included in the output).
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self._held = 0  # trailing chars of _tail not emitted yet
        self._matched: str | None = None
        self._truncated = 0

    @property
    def matched(self) -> str | None:
        """The stop string that ended the sequence, or None."""
        return self._matched

    @property
    def truncated_chars(self) -> int:
        """Characters fed but never to be emitted: those after the stop (and the stop itself unless
        included). 0 until a stop matches."""
        return self._truncated

    @property
    def held_chars(self) -> int:
        """Characters fed but not yet emitted because they may start a stop string."""
        return self._held

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Consume the next text delta; return the text now safe to emit and the stop string matched
        by it (None if none). Feeding after a match is an error: the sequence has ended."""
        if self._matched is not None:
            raise ValueError(f"stop string {self._matched!r} already matched; this sequence has finished")
        if not delta or not self._stops:
            return delta, None
        text = self._tail + delta
        unemitted_from = len(self._tail) - self._held
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include else start
            # A stop starting inside already-emitted text would have been held back instead.
            assert end >= unemitted_from, "held-back text must cover any stop string prefix"
            self._matched = stop
            self._truncated = len(text) - end
            self._tail, self._held = "", 0
            return text[unemitted_from:end], stop
        self._held = 0 if self._include else self._partial_match_len(text)
        self._tail = text[max(0, len(text) - self._keep) :]
        return text[unemitted_from : len(text) - self._held], None

    def flush(self) -> str:
        """The held-back text, when the sequence ends without a stop string (else ``""``)."""
        if self._matched is not None or not self._held:
            return ""
        held = self._tail[len(self._tail) - self._held :]
        self._held = 0
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        # No stop occurs inside the old tail (it would have matched then), so every occurrence
        # found here ends in the new delta; str.find gives each stop's earliest one.
        best: tuple[int, int, str] | None = None  # (end, -length, stop) orders by end, then longer
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[0] + best[1], best[2])

    def _partial_match_len(self, text: str) -> int:
        # Longest suffix of `text` that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
