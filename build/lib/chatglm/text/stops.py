"""Stop sequences over a stream of text deltas."""
from __future__ import annotations

from typing import Iterable


class StopSequenceMatcher:
    """Cuts a text stream at the first stop sequence, whatever the chunking.

    Text that could be the start of a stop sequence is held back until it is known not to be.
    The result does not depend on how the text is split into chunks: the stop sequence whose match
    ends first wins (the earlier-starting one on a tie).
    """

    def __init__(self, stop_sequences: Iterable[str]) -> None:
        """Watch for ``stop_sequences``; empty strings are ignored."""
        stops = list(stop_sequences)
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop sequences must be strings, got {type(s).__name__}: {s!r}")
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self._held = ""
        self.hit = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add a chunk; return the text safe to emit and whether a stop sequence was hit (then the
        text is everything before the stop sequence, and later pushes return ``("", True)``)."""
        if self.hit:
            return "", True
        buf = self._held + text
        best: tuple[int, int] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at + len(stop), at) < best):
                best = (at + len(stop), at)
        if best is not None:
            self.hit, self._held = True, ""
            return buf[:best[1]], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """End of the stream without a hit: release the held-back text."""
        text, self._held = self._held, ""
        return text

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
