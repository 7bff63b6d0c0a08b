"""A prompt that writes its own beginning-of-sequence marker: one BOS, as if it had not.

Clients that format Llama-2 chat markup themselves (MLflow AI Gateway's MosaicML provider, scripts following Meta's
reference) start the text with a literal "<s>". Tokenized as it is, with the BOS a tokenizer adds, that prompt would
begin with two BOS tokens, and the first word after the literal would lose its word-start marker. Dropping the literal
and letting the tokenizer add its BOS gives exactly the reference encoding. Worker and router both apply this, so the
router's block keys stay the worker's."""

from __future__ import annotations


def without_leading_bos(text: str, bos_text: str | None) -> str:
    """`text` without a leading `bos_text` (None: the tokenizer adds no BOS of its own; the literal then stays)."""
    if bos_text and text.startswith(bos_text):
        return text[len(bos_text):]
    return text
