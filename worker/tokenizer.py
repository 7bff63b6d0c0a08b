"""The checkpoint's tokenizer, end-of-sequence ids and sampling defaults, loaded once per worker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from common.bos import without_leading_bos
from worker import chat_template
from worker.detokenizer import TokenDecoder


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json (only keys it sets; temperature 0 if no sampling)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_file(cls, path: Path) -> GenerationDefaults:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        if not raw.get("do_sample", False):
            return cls(repetition_penalty=float(raw.get("repetition_penalty", 1.0)))
        return cls(
            temperature=float(raw.get("temperature", 1.0)),
            top_p=float(raw.get("top_p", 1.0)),
            top_k=int(raw.get("top_k", 0)),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
        )


def _eos_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    path = model_dir / "generation_config.json"
    if path.exists():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class Tokenizer:
    """Encodes prompts and chat turns; decodes through a streaming TokenDecoder."""

    def __init__(self, model_dir: Path, vocab_size: int):
        model_dir = Path(model_dir)
        self.hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_token_ids = _eos_ids(model_dir, self.hf)
        self.bos_token_id = self.hf.bos_token_id
        adds_bos = self.bos_token_id is not None and self.hf("", add_special_tokens=True)["input_ids"][:1] == [
            self.bos_token_id]
        self._bos_text = self.hf.bos_token if adds_bos else None  # (common.bos)
        self.decoder = TokenDecoder.from_tokenizer(self.hf, vocab_size)
        self.defaults = GenerationDefaults.from_file(model_dir / "generation_config.json")
        self._pieces: dict[int, str] = {}  # token id -> piece (logprobs)

    def piece(self, token_id: int) -> str:
        """A token's own text, as an API reports it next to its logprob: SentencePiece's word-start mark as the
        space it stands for, a byte token (<0x0A>) as its character (a UTF-8 continuation byte as U+FFFD)."""
        text = self._pieces.get(token_id)
        if text is None:
            token = self.hf.convert_ids_to_tokens(token_id)
            if token is None:
                text = ""
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                text = bytes([int(token[3:5], 16)]).decode("utf-8", errors="replace")
            else:
                text = token.replace("\u2581", " ")
            self._pieces[token_id] = text
        return text

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids for plain text, with the beginning-of-sequence token as transformers adds it (once, also for a
        text that starts with the BOS literal itself: common.bos)."""
        return list(self.hf(without_leading_bos(text, self._bos_text), add_special_tokens=True)["input_ids"])

    def encode_dialog(self, messages) -> list[int]:
        return chat_template.encode_dialog(self.hf, messages)

    def encode_next_turn(self, messages) -> list[int]:
        return chat_template.encode_next_turn(self.hf, messages)
