"""Stop sequences over a stream of text deltas, matched by an Aho-Corasick automaton."""
from __future__ import annotations

from typing import Iterable

MAX_STOP_SEQUENCES = 32
"""At most this many stop sequences per request."""
MAX_STOP_CHARS = 500
"""Each stop sequence is at most this many characters long."""


class StopSequenceMatcher:
    """Cuts a text stream at the first stop sequence, whatever the chunking.

    Text that could be the start of a stop sequence is held back until it is known not to be.
    The result does not depend on how the text is split into chunks: the stop sequence whose match
    ends first wins (the earlier-starting one on a tie).

    Each character is fed once through an Aho-Corasick automaton built from the stop sequences, so
    a push costs time proportional to its own text (amortized), not to the number or the length of
    the stop sequences; the text held back is at most the longest stop sequence minus one character.
    """

    def __init__(self, stop_sequences: Iterable[str]) -> None:
        """Watch for ``stop_sequences``; empty strings are ignored. More than
        :data:`MAX_STOP_SEQUENCES`, or one longer than :data:`MAX_STOP_CHARS`, is a ValueError."""
        stops = list(stop_sequences)
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop sequences must be strings, got {type(s).__name__}: {s!r}")
        check_stop_bounds(stops)
        self._build(sorted({s for s in stops if s}))
        self._state = 0
        self._held = ""
        self.hit = False

    def _build(self, stops: list[str]) -> None:
        # State 0 is the root; goto[s] maps a character to the next state of the trie.
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        for stop in stops:
            s = 0
            for ch in stop:
                nxt = goto[s].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[s][ch] = nxt
                    goto.append({})
                    depth.append(depth[s] + 1)
                s = nxt
        match = [0] * len(goto)  # length of the longest stop sequence that ends at this state
        for stop in stops:
            s = 0
            for ch in stop:
                s = goto[s][ch]
            match[s] = len(stop)
        fail = [0] * len(goto)
        order = list(goto[0].values())
        for s in order:  # breadth-first, so a state's failure target is finished before it
            for ch, t in goto[s].items():
                f = fail[s]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[t] = goto[f].get(ch, 0)
                # A longer stop ending here starts earlier, so it wins the tie over its suffixes.
                match[t] = match[t] or match[fail[t]]
                order.append(t)
        self._goto, self._fail, self._depth, self._match = goto, fail, depth, match

    def _step(self, s: int, ch: str) -> int:
        goto, fail = self._goto, self._fail
        while s and ch not in goto[s]:
            s = fail[s]
        return goto[s].get(ch, 0)

    def push(self, text: str) -> tuple[str, bool]:
        """Add a chunk; return the text safe to emit and whether a stop sequence was hit (then the
        text is everything before the stop sequence, and later pushes return ``("", True)``)."""
        if self.hit:
            return "", True
        s = self._state
        for i, ch in enumerate(text):
            s = self._step(s, ch)
            if self._match[s]:
                buf = self._held + text[:i + 1]
                self.hit, self._held, self._state = True, "", 0
                return buf[:len(buf) - self._match[s]], True
        self._state = s
        buf = self._held + text
        keep = self._depth[s]
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """End of the stream without a hit: release the held-back text."""
        text, self._held, self._state = self._held, "", 0
        return text


def check_stop_bounds(stops: list[str]) -> None:
    """ValueError when ``stops`` has more than :data:`MAX_STOP_SEQUENCES` non-empty entries or one
    longer than :data:`MAX_STOP_CHARS` characters."""
    given = [s for s in stops if s]
    if len(given) > MAX_STOP_SEQUENCES:
        raise ValueError(f"{len(given)} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed")
    for i, s in enumerate(given):
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop sequence {i} is {len(s)} characters long; each may have at most "
                             f"{MAX_STOP_CHARS}")
