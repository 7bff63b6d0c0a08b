"""Streaming detokenization for SentencePiece (byte-fallback) tokenizers, with stop strings."""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenDecoder:
    """An id -> bytes table built once per tokenizer; hands out one TextStream per request."""

    def __init__(self, pieces: Sequence[bytes]):
        self.pieces = tuple(pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> TokenDecoder:
        """Build the table for a Llama-style transformers tokenizer and the model's vocab_size: `▁` pieces
        become b" "-prefixed UTF-8, `<0xNN>` that byte, special tokens and ids past the tokenizer b""."""
        num_known = min(len(tokenizer), vocab_size)
        tokens = tokenizer.convert_ids_to_tokens(list(range(num_known)))
        special_ids = set(tokenizer.all_special_ids)
        added = tokenizer.added_tokens_decoder
        pieces = []
        for token_id, token in enumerate(tokens):
            if token is None or token_id in special_ids or (token_id in added and added[token_id].special):
                pieces.append(b"")
            elif token_id in added:
                pieces.append(token.encode())
            else:
                pieces.append(piece_bytes(token))
        pieces.extend(b"" for _ in range(vocab_size - num_known))
        return cls(pieces)

    def stream(self, stop: tuple[str, ...] = (), skip_leading_space: bool = False) -> TextStream:
        """A fresh stream for one request's generated tokens; stop strings end it (excluded from the text)."""
        return TextStream(self.pieces, stop, skip_leading_space)


def piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece piece stands for: `<0xNN>` is one raw byte, `▁` is a space."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


class TextStream:
    """Turns token ids into text deltas: valid UTF-8 only, with any possible start of a stop string held
    back until it is ruled out; a completed stop string ends the stream and is never released."""

    def __init__(self, pieces: Sequence[bytes], stop: tuple[str, ...] = (), skip_leading_space: bool = False):
        self._pieces = pieces
        self._stop = tuple(s for s in stop if s)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released: a possible start of a stop string
        self._released: list[str] = []
        self._skip_space = skip_leading_space
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._released)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it makes releasable (often "")."""
        if self.stopped:
            return ""
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        if self._skip_space and piece:
            self._skip_space = False
            piece = piece.removeprefix(b" ")
        return self._release(self._utf8.decode(piece), final=False)

    def replay(self, token_ids: Sequence[int]) -> None:
        """Feed tokens whose text a client already has (a request resumed on another worker): the stream
        ends in the state an uninterrupted run had after them, holding back what that run held back (an
        incomplete character, a possible start of a stop string), so the next push releases exactly what
        it would have. Their text counts in `text` but is not returned."""
        for token_id in token_ids:
            self.push(token_id)

    def flush(self) -> str:
        """Release what is held back at the end (an incomplete UTF-8 tail becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        if not self._stop:
            delta = new_text
        else:
            pending = self._held + new_text
            cut = _earliest_stop(pending, self._stop)
            if cut is not None:
                self.stopped = True
                delta, self._held = pending[:cut], ""
            else:
                keep = 0 if final else _longest_stop_prefix_suffix(pending, self._stop)
                delta, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if delta:
            self._released.append(delta)
        return delta


def _earliest_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    # length of the longest suffix of text that is a proper prefix of some stop string
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best
