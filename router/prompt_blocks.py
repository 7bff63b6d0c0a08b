"""A prompt's cacheable blocks as its worker will name them: the worker's own tokenizer (Worker.Tokenizer), then
common.block_hash over the ids. Tokenizing is the costly part of a routing decision (about 1 µs per token), so
the last prompts' keys are kept: a retried or repeated prompt costs one dict lookup."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from tokenizers import Tokenizer

from common.block_hash import prompt_block_keys

CACHED_PROMPTS = 256  # prompts whose keys are kept (keyed by a digest of the text, never the text itself)


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """A prompt's leading full blocks a worker could serve from its cache (block_key each, in order)."""

    keys: tuple[int, ...]
    block_size: int
    num_tokens: int  # the whole prompt's


class PromptEncoder:
    """Encodes prompts exactly as the workers that sent `tokenizer_json` do (Job.text: add_special_tokens)."""

    def __init__(self, tokenizer_json: str, block_size: int) -> None:
        self.fingerprint = self.fingerprint_of(tokenizer_json)
        self.block_size = block_size
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._recent: OrderedDict[bytes, PromptBlocks] = OrderedDict()

    @staticmethod
    def fingerprint_of(tokenizer_json: str) -> str:
        return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]

    def blocks(self, text: str) -> PromptBlocks:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        found = self._recent.get(digest)
        if found is not None:
            self._recent.move_to_end(digest)
            return found
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        found = self.blocks_of_ids(ids)
        self._recent[digest] = found
        if len(self._recent) > CACHED_PROMPTS:
            self._recent.popitem(last=False)
        return found

    def blocks_of_ids(self, ids) -> PromptBlocks:
        return PromptBlocks(tuple(prompt_block_keys(ids, self.block_size)), self.block_size, len(ids))
