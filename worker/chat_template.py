"""Llama-2 chat prompts, built at token level the way Meta's reference chat_completion builds them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; field names the culprit, e.g. "messages[2].role"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_messages(messages, *, max_message_chars: int, is_continuation: bool = False) -> None:
    """Check a conversation (or, with is_continuation, a live session's next turn) before encoding.

    A conversation is an optional system message, then user and assistant messages alternating, ending
    with a user message. A later turn of a session has no system message. Raises ChatTemplateError."""
    pairs = _as_pairs(messages)
    for i, (role, content) in enumerate(pairs):
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{i}].role", "must be system, user or assistant")
        if not content.strip():
            raise ChatTemplateError(f"messages[{i}].content", "must not be empty")
        if len(content) > max_message_chars:
            raise ChatTemplateError(f"messages[{i}].content", f"longer than {max_message_chars} characters")
    _check_structure([role for role, _ in pairs], is_continuation)


def render_dialog(messages) -> str:
    """The prompt as text, with literal <s> and </s>: what the standard Llama-2 Jinja template renders."""
    segments = _segments(messages, False)
    return "".join(BOS_TEXT + text + (EOS_TEXT if closed else "") for text, closed in segments)


def encode_dialog(tokenizer, messages) -> list[int]:
    """Prompt ids of a whole conversation (system message folded into the first user message)."""
    return _encode(tokenizer, _segments(messages, False))


def encode_next_turn(tokenizer, messages) -> list[int]:
    """Ids of a live session's next turn (new messages: user, or assistant/user pairs ending with user).

    A session's ids are encode_dialog(first turn) + reply ids + [eos] + encode_next_turn(new messages).
    That equals encode_dialog of the whole history exactly when the reply ids are the ids that encoding
    puts between the pair's [/INST] and eos, i.e. the pieces of f" {reply.strip()} " including the final
    "▁" piece. Models often end a reply without that piece, so sessions keep the generated ids as they are."""
    return _encode(tokenizer, _segments(messages, True))


def _as_pairs(messages: Iterable) -> list[tuple[str, str]]:
    # ChatMessage (or anything with .role/.content), a {"role", "content"} mapping, or a (role, content) pair
    pairs = []
    for m in messages:
        if isinstance(m, Mapping):
            pairs.append((m["role"], m["content"]))
        elif hasattr(m, "role"):
            pairs.append((m.role, m.content))
        else:
            role, content = m
            pairs.append((role, content))
    return pairs


def _check_structure(roles: list[str], is_continuation: bool) -> None:
    if not roles:
        raise ChatTemplateError("messages", "must contain at least one message")
    offset = 0
    if roles[0] == "system":
        if is_continuation:
            raise ChatTemplateError("messages[0].role", "a system message is only allowed in the first turn")
        offset = 1
    for i in range(offset, len(roles)):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if roles[i] == "system":
            raise ChatTemplateError(f"messages[{i}].role", "a system message may only come first")
        if roles[i] != expected:
            raise ChatTemplateError(f"messages[{i}].role", f"expected {expected}: roles alternate")
    if roles[-1] != "user":
        raise ChatTemplateError(f"messages[{len(roles) - 1}].role", "the last message must be a user message")


def _segments(messages, is_continuation: bool) -> list[tuple[str, bool]]:
    # -> [(text between bos and eos, whether the (user, assistant) pair is complete and closed by eos)]
    pairs = _as_pairs(messages)
    _check_structure([role for role, _ in pairs], is_continuation)
    contents = [content for _, content in pairs]
    if pairs[0][0] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1], *contents[2:]]
    segments = [
        (f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", True)
        for user, answer in zip(contents[:-1:2], contents[1::2], strict=True)
    ]
    segments.append((f"{B_INST} {contents[-1].strip()} {E_INST}", False))
    return segments


def _encode(tokenizer, segments: list[tuple[str, bool]]) -> list[int]:
    ids: list[int] = []
    for text, closed in segments:
        ids.append(tokenizer.bos_token_id)
        # NOTE: text is never parsed for control tokens: a literal "</s>" stays text, as in SentencePiece.
        ids.extend(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        if closed:
            ids.append(tokenizer.eos_token_id)
    return ids
