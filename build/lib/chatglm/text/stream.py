"""Incremental text output: token ids to text deltas that never split a character."""
from __future__ import annotations

from typing import Protocol, Sequence


class PieceDecoder(Protocol):
    """What the stream decoder needs of a tokenizer (the tokenizer imports this module, not back)."""

    def check_id(self, token_id: int) -> int: ...
    def is_padding(self, token_id: int) -> bool: ...
    def is_special(self, token_id: int) -> bool: ...
    def is_control(self, token_id: int) -> bool: ...
    def special_text(self, token_id: int) -> str: ...
    def byte_value(self, token_id: int) -> int | None: ...
    def decode_pieces(self, ids: Sequence[int], continuation: bool) -> str: ...

INVALID = 0
INCOMPLETE = -1


def _is_one_char(chunk: bytes) -> bool:
    try:
        return len(chunk.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def utf8_char_status(data: bytes, pos: int) -> int:
    """What SentencePiece's decoder sees at ``data[pos]``: the length of the complete valid UTF-8
    character starting there, :data:`INVALID` (this byte becomes one U+FFFD whatever follows), or
    :data:`INCOMPLETE` (a proper prefix of a valid character that more bytes could complete)."""
    lead = data[pos]
    if lead < 0x80:
        need = 1
    elif 0xC2 <= lead <= 0xDF:
        need = 2
    elif 0xE0 <= lead <= 0xEF:
        need = 3
    elif 0xF0 <= lead <= 0xF4:
        need = 4
    else:
        return INVALID
    chunk = data[pos:pos + need]
    if len(chunk) == need:
        return need if _is_one_char(chunk) else INVALID
    missing = need - len(chunk)
    if len(chunk) >= 2:
        return INCOMPLETE if _is_one_char(chunk + b"\x80" * missing) else INVALID
    seconds = (0x80, 0x90, 0xA0)  # E0, ED, F0, F4 restrict the second byte; one of these fits each
    if any(_is_one_char(chunk + bytes([b]) + b"\x80" * (missing - 1)) for b in seconds):
        return INCOMPLETE
    return INVALID


class StreamDecoder:
    """Turns token ids pushed one at a time into text deltas.

    ``"".join(pushes) + flush() == tokenizer.decode(ids, skip_special_tokens)`` for any ids. Text is
    emitted as soon as it is final; only the trailing byte pieces of a UTF-8 character that more
    bytes could still complete are held back (at most three ids), so a delta never holds a broken
    character, and every push costs a bounded amount of work.
    """

    def __init__(self, tokenizer: PieceDecoder, skip_special_tokens: bool = True) -> None:
        """Decode with ``tokenizer``; special tokens are dropped when ``skip_special_tokens``."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._held: list[int] = []
        self._started = False

    @property
    def held_ids(self) -> tuple[int, ...]:
        """Ids pushed but not rendered yet (an incomplete UTF-8 character)."""
        return tuple(self._held)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text since the last call ("" while it must hold back)."""
        tok = self._tok
        i = tok.check_id(token_id)
        if tok.is_padding(i):
            return ""
        if tok.is_special(i):
            text = self.flush()
            return text if self._skip else text + tok.special_text(i)
        self._held.append(i)
        ready = self._final_length()
        if ready == 0:
            return ""
        text = self._render(self._held[:ready])
        del self._held[:ready]
        return text

    def flush(self) -> str:
        """End of the stream: return the held-back text (incomplete bytes become U+FFFD) and reset,
        so the decoder can start a new stream."""
        text = self._render(self._held) if self._held else ""
        self._held = []
        self._started = False
        return text

    def _render(self, ids: list[int]) -> str:
        text = self._tok.decode_pieces(ids, continuation=self._started)
        if not self._started:
            self._started = any(not self._tok.is_control(i) for i in ids)
        return text

    def _final_length(self) -> int:
        """How many leading held ids render to text that no later id can change."""
        held = self._held
        start = len(held)
        while start > 0 and self._tok.byte_value(held[start - 1]) is not None:
            start -= 1
        data = bytes(self._tok.byte_value(i) for i in held[start:])
        pos = 0
        while pos < len(data):
            status = utf8_char_status(data, pos)
            if status == INCOMPLETE:
                break
            pos += max(status, 1)
        return start + pos
