"""A prompt's cacheable blocks as its worker will name them: the worker's own tokenizer (Worker.Tokenizer), then
common.block_hash over the ids.

Tokenizing is the costly part of a routing decision (about 1 µs per token), and the prompts worth routing by cache
share long prefixes (a system prompt, a document). So a prompt is cut into pieces of about CHUNK_CHARS characters,
each cut just before a space that follows a non-space, and what the prompt's first pieces tokenize and hash to is
kept, keyed by a digest chained over the pieces: a prompt whose first pieces were seen before tokenizes and hashes
only the rest. That is exact only where no token can span such a cut, which the encoder checks of the vocabulary
(no token holds a word-start marker after another character: true of SentencePiece-style BPE vocabularies such as
Llama-2's) and of sample texts when it is built; otherwise every prompt is tokenized whole.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

from common.block_hash import BlockHash, block_key, hash_block
from common.bos import without_leading_bos

CHUNK_CHARS = 256
KEPT_STATES = 8192  # prompt prefixes whose tokens and blocks are kept (about 100 bytes plus the keys each)
WORD_START = "\u2581"  # SentencePiece's visible space ("▁")
SAMPLES = ("Hello world. This is  a test,\tof the  tokenizer's cuts.\n\nNew paragraph: x = y  + 1;",
           " leading space and trailing space ", "naïve café — ünïcödé 東京 😀 words  and\u00a0spaces")


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """A prompt's leading full blocks a worker could serve from its cache (block_key each, in order)."""

    keys: tuple[int, ...]
    block_size: int
    num_tokens: int  # the whole prompt's


@dataclass(frozen=True, slots=True)
class _State:
    """What a prompt's first pieces tokenize to: its tokens past the last full block, the blocks' keys and the
    last full block's hash (the next block's parent)."""

    num_tokens: int
    keys: tuple[int, ...]
    parent: BlockHash | None
    tail: tuple[int, ...]


class PromptEncoder:
    """Encodes prompts exactly as the workers that sent `tokenizer_json` do (Job.text: add_special_tokens)."""

    def __init__(self, tokenizer_json: str, block_size: int) -> None:
        self.fingerprint = self.fingerprint_of(tokenizer_json)
        self.block_size = block_size
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        bos = self._tokenizer.encode("", add_special_tokens=True).ids[:1]
        self._bos_text = self._tokenizer.id_to_token(bos[0]) if bos else None  # (common.bos)
        self._states: OrderedDict[bytes, _State] = OrderedDict()
        self.chunked = self._cuts_are_exact()

    @staticmethod
    def fingerprint_of(tokenizer_json: str) -> str:
        return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]

    def blocks(self, text: str, held: Callable[[int], bool] | None = None) -> PromptBlocks:
        """The prompt's blocks. With `held` (whether some worker has a block key cached), pieces stop being
        tokenized once no worker holds the last block so far: no worker can hold the blocks after it (each key
        names every token before it), so the keys up to there decide as well as all of them, and a prompt nobody
        has cached costs one piece. `num_tokens` then counts the pieces read."""
        text = without_leading_bos(text, self._bos_text)
        if not self.chunked:
            return self.blocks_of_ids(self._tokenizer.encode(text, add_special_tokens=True).ids)
        state = _State(0, (), None, ())
        digest = b""
        pieces = cut(text)
        i = 0
        while i < len(pieces):  # the longest run of first pieces already seen
            found = self._states.get(next_digest := _chain(digest, pieces[i]))
            if found is None:
                break
            self._states.move_to_end(next_digest)
            state, digest, i = found, next_digest, i + 1
        for piece in pieces[i:]:
            if held is not None and state.keys and not held(state.keys[-1]):
                break
            ids = self._tokenizer.encode(piece, add_special_tokens=state.num_tokens == 0).ids
            state = self._extend(state, ids)
            digest = _chain(digest, piece)
            self._states[digest] = state
        while len(self._states) > KEPT_STATES:
            self._states.popitem(last=False)
        return self._finish(state)

    def blocks_of_ids(self, ids) -> PromptBlocks:
        return self._finish(self._extend(_State(0, (), None, ()), ids))

    def _extend(self, state: _State, ids) -> _State:
        bs = self.block_size
        tail = [*state.tail, *ids]
        keys, parent = list(state.keys), state.parent
        full = len(tail) // bs * bs
        for start in range(0, full, bs):
            parent = hash_block(parent, tail[start : start + bs])
            keys.append(block_key(parent))
        return _State(state.num_tokens + len(ids), tuple(keys), parent, tuple(tail[full:]))

    def _finish(self, state: _State) -> PromptBlocks:
        # a worker serves at most num_tokens - 1 tokens from cache (common.block_hash.cacheable_blocks)
        keys = state.keys if state.tail else state.keys[:-1]
        return PromptBlocks(keys, self.block_size, state.num_tokens)

    def _cuts_are_exact(self) -> bool:
        """Whether tokenizing piece by piece gives the whole text's ids for this tokenizer: no token spans a cut
        (checked on the vocabulary), and the samples' ids agree (the pre-tokenizer and normalizer behave)."""
        for token in self._tokenizer.get_vocab():
            if any(c == WORD_START and token[i - 1] != WORD_START for i, c in enumerate(token) if i):
                return False
        for sample in SAMPLES:
            whole = self._tokenizer.encode(sample, add_special_tokens=True).ids
            pieces = cut(sample, chunk_chars=1)
            parts = [i for n, p in enumerate(pieces)
                     for i in self._tokenizer.encode(p, add_special_tokens=n == 0).ids]
            if parts != whole:
                return False
        return True


def cut(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """`text` in pieces of at least `chunk_chars` characters (the last may be shorter), each piece after the first
    starting at a space that follows a non-space character."""
    pieces = []
    start = 0
    n = len(text)
    while start < n:
        at = start + chunk_chars
        while at < n and not (text[at] == " " and text[at - 1] not in " \t\n\r\u00a0"):
            at += 1
        pieces.append(text[start:at])
        start = at
    return pieces


def _chain(digest: bytes, piece: str) -> bytes:
    return hashlib.blake2b(digest + piece.encode(), digest_size=16).digest()
