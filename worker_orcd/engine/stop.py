"""Stop strings matched on streamed text, across token boundaries.

The matcher emits text as soon as no stop string can begin in it. It holds back the tail of the
text that could still grow into a stop string, and on a match it returns what precedes the
earliest match in the whole text; neither the stop string nor anything after it is ever emitted.
The text is compared as Python strings (code points), as the incremental decoder produces it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class StopMatcher:
    """feed(delta) -> (safe text, matched stop or None); flush() at the end of generation."""

    __slots__ = ("_stops", "_pending", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._pending = ""
        self.matched: str | None = None  # the stop string found, once one is

    @property
    def pending(self) -> str:
        """Text received but held back because a stop string may start in it."""
        return self._pending

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Take the next piece of text; return what may be emitted now and the stop matched now.

        After a match every later call returns ("", None).
        """
        if self.matched is not None:
            return "", None
        if not self._stops:
            return delta, None
        text = self._pending + delta
        hit, stop = self._first_match(text)
        hold = self._first_partial(text, hit if hit is not None else len(text))
        if hit is not None and hold is None:
            # no earlier start can still become a match: this one is final
            self._pending = ""
            self.matched = stop
            return text[:hit], stop
        cut = hold if hold is not None else len(text)
        self._pending = text[cut:]
        return text[:cut], None

    def flush(self) -> str:
        """The held-back text, at the end of generation.

        The held-back text can hold a complete stop string that waited on an earlier, longer one
        that never completed; then only the text before it is returned and `matched` is set, so
        check `matched` after flushing too.
        """
        if self.matched is not None:
            return ""
        text, self._pending = self._pending, ""
        hit, stop = self._first_match(text)
        if hit is None:
            return text
        self.matched = stop
        return text[:hit]

    def _first_match(self, text: str) -> tuple[int | None, str | None]:
        """Earliest complete occurrence of any stop; at equal starts the shortest stop."""
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i, len(s)) < best[:2]):
                best = (i, len(s), s)
        return (best[0], best[2]) if best else (None, None)

    def _first_partial(self, text: str, before: int) -> int | None:
        """Earliest start < `before` whose rest of `text` is a proper prefix of some stop."""
        longest = max(len(s) for s in self._stops)
        for start in range(max(0, len(text) - longest + 1), min(before, len(text))):
            tail = text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return start
        return None
