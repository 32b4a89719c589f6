"""The ChatGLM2 / ChatGLM3 tokenizer: a SentencePiece model plus nine special tokens.

Ids below 64 789 are SentencePiece pieces (``tokenizer.model``); the special tokens are not in the
SentencePiece model, they are numbered after its last piece. The embedding and output matrices
have 65 024 rows, so ids 64 798 .. 65 023 exist in the model but are not tokens.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import ClassVar, Iterable

import sentencepiece as spm

from .stream import StreamDecoder


class ChatGLMTokenizer:
    """Encode text to ChatGLM token ids and decode ids back to text, like the official tokenizer."""

    SPECIAL_TOKENS: ClassVar[dict[str, int]] = {
        "[MASK]": 64789,
        "[gMASK]": 64790,
        "[sMASK]": 64791,
        "sop": 64792,
        "eop": 64793,
        "<|system|>": 64794,
        "<|user|>": 64795,
        "<|assistant|>": 64796,
        "<|observation|>": 64797,
    }
    FIRST_SPECIAL_ID: ClassVar[int] = 64789
    PADDED_VOCAB_SIZE: ClassVar[int] = 65024
    eos_id: ClassVar[int] = 2
    pad_id: ClassVar[int] = 0

    def __init__(self, model_file: str | Path) -> None:
        """Load the SentencePiece model ``model_file`` (the ``tokenizer.model`` of a ChatGLM model)."""
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist or is not a file")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.num_pieces: int = self._sp.get_piece_size()
        if self.num_pieces > self.FIRST_SPECIAL_ID:
            raise ValueError(
                f"{path} has {self.num_pieces} pieces, but ChatGLM's special tokens start at id "
                f"{self.FIRST_SPECIAL_ID}; this is not a ChatGLM2/ChatGLM3 tokenizer.model")
        self._special_text = {i: t for t, i in self.SPECIAL_TOKENS.items()}
        self._byte_value = {i: int(self._sp.id_to_piece(i)[3:5], 16)
                            for i in range(self.num_pieces) if self._sp.is_byte(i)}
        self._anchor: tuple[int, str] | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatGLMTokenizer":
        """Load ``model_dir/tokenizer.model``."""
        path = Path(model_dir) / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: tokenizer.model ships next to config.json in every official "
                f"ChatGLM2/ChatGLM3 model directory; run `python -m chatglm.download` to fill "
                f"{Path(model_dir)} (or copy tokenizer.model into it)")
        return cls(path)

    @property
    def vocab_size(self) -> int:
        """Number of token ids: the pieces plus the special tokens (64 798 for ChatGLM2/3)."""
        return self.FIRST_SPECIAL_ID + len(self.SPECIAL_TOKENS)

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``"[gMASK]"`` or ``"<|user|>"``."""
        try:
            return self.SPECIAL_TOKENS[token]
        except KeyError:
            known = ", ".join(self.SPECIAL_TOKENS)
            raise KeyError(f"{token!r} is not a ChatGLM special token; known: {known}") from None

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece ids of ``text``: no prompt prefix, special-token text stays text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, exactly as the official tokenizer decodes ordinary ids.

        Special tokens render as their text (nothing with ``skip_special_tokens``); they split the
        ids into runs that are decoded separately, with or without skipping. Ids 64 798 .. 65 023
        are embedding padding rows, not tokens: they decode to "" and are ignored as if absent.
        """
        parts: list[str] = []
        run: list[int] = []
        for raw in ids:
            token_id = self.check_id(raw)
            if token_id < self.FIRST_SPECIAL_ID:
                run.append(token_id)
                continue
            if self.is_padding(token_id):
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            if not skip_special_tokens:
                parts.append(self._special_text[token_id])
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A :class:`StreamDecoder` that turns ids pushed one at a time into text deltas."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def check_id(self, token_id: int) -> int:
        """``token_id`` as an int; ValueError when it is not an id of this tokenizer or model."""
        i = operator.index(token_id)
        if not 0 <= i < self.PADDED_VOCAB_SIZE:
            raise ValueError(
                f"token id {i} is outside [0, {self.PADDED_VOCAB_SIZE}): ChatGLM token ids are "
                f"0..{self.vocab_size - 1} (ids up to {self.PADDED_VOCAB_SIZE - 1} are embedding padding)")
        if self.num_pieces <= i < self.FIRST_SPECIAL_ID:
            raise ValueError(f"token id {i} is not in {self.model_file}, which has {self.num_pieces} pieces "
                             f"(special tokens start at {self.FIRST_SPECIAL_ID})")
        return i

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of :attr:`SPECIAL_TOKENS`."""
        return token_id in self._special_text

    def is_padding(self, token_id: int) -> bool:
        """Whether ``token_id`` is an embedding padding row (64 798 .. 65 023), not a token."""
        return self.vocab_size <= token_id < self.PADDED_VOCAB_SIZE

    def special_text(self, token_id: int) -> str:
        """Text of the special token ``token_id``."""
        return self._special_text[token_id]

    def byte_value(self, token_id: int) -> int | None:
        """The byte of a byte-fallback piece (``<0x41>`` -> 0x41), None for any other id."""
        return self._byte_value.get(token_id)

    def is_control(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control piece (``<s>``, ``</s>``): it renders as nothing and
        does not count as the first piece of a text."""
        return token_id < self.num_pieces and self._sp.is_control(token_id)

    def decode_pieces(self, ids: list[int], continuation: bool = False) -> str:
        """Decode ordinary (piece) ids as one run. With ``continuation`` the ids are rendered as
        if they followed earlier pieces of the same run, i.e. the first piece keeps its leading
        ``▁`` as a space (plain decoding drops it, as SentencePiece does at the start of a text)."""
        if not continuation:
            return self._sp.decode(ids)
        anchor_id, anchor_text = self._continuation_anchor()
        return self._sp.decode([anchor_id, *ids])[len(anchor_text):]

    def _continuation_anchor(self) -> tuple[int, str]:
        """A piece that renders as fixed non-space text and completes any byte sequence before it:
        decoding it first makes the following pieces render as they do in the middle of a text."""
        if self._anchor is None:
            candidates = [self._sp.piece_to_id("<0x41>")] + list(range(self.num_pieces))
            for i in candidates:
                if i < 0 or i >= self.num_pieces or self._sp.is_control(i) or self._sp.is_unknown(i):
                    continue
                text = self._sp.decode([i])
                if text and not text[0].isspace() and "\ufffd" not in text:
                    self._anchor = (i, text)
                    break
            else:
                raise ValueError(f"{self.model_file} has no piece that renders as plain text; "
                                 "it cannot be decoded incrementally")
        return self._anchor
