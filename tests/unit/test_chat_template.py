"""Llama-2 chat template: text parity with the Jinja template, token layout, validation fields."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from worker.chat_template import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    ChatMessage,
    ChatTemplateError,
    encode_dialog,
    encode_next_turn,
    render_dialog,
    validate_messages,
)
from worker.model.tiny import LLAMA2_CHAT_TEMPLATE

CONVERSATIONS = [
    [("user", "Hello!")],
    [("system", "You are terse."), ("user", "Hi")],
    [("user", "  padded question \n"), ("assistant", "\n an answer  "), ("user", "and then?")],
    [
        ("system", " Be kind.\n"),
        ("user", "First"),
        ("assistant", "Reply one"),
        ("user", "Second: café 世界"),
        ("assistant", "Reply two 😀"),
        ("user", "Third\nline"),
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tiny checkpoint's Llama-2-style tokenizer: byte-fallback BPE, <0x00>..<0xFF> at ids 3..258."""
    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def _dicts(conversation):
    return [{"role": role, "content": content} for role, content in conversation]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_the_tokenizer_carries_the_standard_llama2_template(tokenizer):
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_render_matches_the_jinja_template(tokenizer, conversation):
    expected = tokenizer.apply_chat_template(_dicts(conversation), tokenize=False)
    assert render_dialog(conversation) == expected
    assert render_dialog([ChatMessage(r, c) for r, c in conversation]) == expected
    assert render_dialog(_dicts(conversation)) == expected


def test_render_literal_form():
    conversation = [("system", "S"), ("user", " u1 "), ("assistant", " a1"), ("user", "u2 ")]
    expected = "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n u1 [/INST] a1 </s><s>[INST] u2 [/INST]"
    assert render_dialog(conversation) == expected  # the folded first message is stripped as a whole


def test_single_user_message_ids(tokenizer):
    ids = encode_dialog(tokenizer, [("user", " Hello! ")])
    assert ids == [tokenizer.bos_token_id, *_encode(tokenizer, f"{B_INST} Hello! {E_INST}")]


def test_system_message_is_folded_into_the_first_user_message(tokenizer):
    ids = encode_dialog(tokenizer, [("system", "Be kind."), ("user", "Hi")])
    text = f"{B_INST} {B_SYS}Be kind.{E_SYS}Hi {E_INST}"
    assert ids == [tokenizer.bos_token_id, *_encode(tokenizer, text)]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_dialog_ids_are_bos_segment_eos_per_pair(tokenizer, conversation):
    ids = encode_dialog(tokenizer, conversation)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    num_pairs = sum(1 for role, _ in conversation if role == "assistant")
    assert ids.count(bos) == num_pairs + 1 and ids.count(eos) == num_pairs
    assert ids[0] == bos and ids[-1] != eos
    starts = [i for i, t in enumerate(ids) if t == bos]
    segments = [ids[a:b] for a, b in zip(starts, [*starts[1:], len(ids)], strict=True)]
    texts = render_dialog(conversation).split("<s>")[1:]
    for segment, text in zip(segments, texts, strict=True):
        closed = text.endswith("</s>")
        body = segment[1:-1] if closed else segment[1:]
        assert body == _encode(tokenizer, text.removesuffix("</s>"))
        assert (segment[-1] == eos) == closed


def test_control_token_text_in_content_stays_text(tokenizer):
    ids = encode_dialog(tokenizer, [("user", "say </s><s> please")])
    assert ids.count(tokenizer.eos_token_id) == 0
    assert ids.count(tokenizer.bos_token_id) == 1


def test_session_ids_equal_the_whole_dialog_when_reply_ids_match(tokenizer):
    history = CONVERSATIONS[3]
    first_turn, later = history[:2], history[2:]
    full = encode_dialog(tokenizer, [*history[:3], ("user", "x")])
    eos = tokenizer.eos_token_id
    turn_one = encode_dialog(tokenizer, first_turn)
    reply_ids = full[len(turn_one) : full.index(eos)]
    assert full[: len(turn_one)] == turn_one  # the pair's encoding continues the user-only encoding
    session = turn_one + reply_ids + [eos] + encode_next_turn(tokenizer, later[1:])
    assert session == encode_dialog(tokenizer, history)
    assert encode_next_turn(tokenizer, later[1:])[0] == tokenizer.bos_token_id


def test_next_turn_may_carry_assistant_user_pairs(tokenizer):
    new = [("user", "Second"), ("assistant", "Reply"), ("user", "Third")]
    ids = encode_next_turn(tokenizer, new)
    assert ids == encode_dialog(tokenizer, new)


def test_next_turn_rejects_a_system_message(tokenizer):
    with pytest.raises(ChatTemplateError) as err:
        encode_next_turn(tokenizer, [("system", "S"), ("user", "u")])
    assert err.value.field == "messages[0].role"


def test_valid_conversations_pass():
    for conversation in CONVERSATIONS:
        validate_messages(conversation, max_message_chars=100)
    later_turn = [("user", "u"), ("assistant", "a"), ("user", "u")]
    validate_messages(later_turn, max_message_chars=10, is_continuation=True)


@pytest.mark.parametrize(
    ("messages", "is_continuation", "field"),
    [
        ([], False, "messages"),
        ([("robot", "x")], False, "messages[0].role"),
        ([("user", "u"), ("tool", "x"), ("user", "u")], False, "messages[1].role"),
        ([("user", "u"), ("system", "s"), ("user", "u")], False, "messages[1].role"),
        ([("system", "s"), ("system", "s"), ("user", "u")], False, "messages[1].role"),
        ([("system", "s"), ("user", "u")], True, "messages[0].role"),
        ([("assistant", "a"), ("user", "u")], False, "messages[0].role"),
        ([("system", "s"), ("assistant", "a"), ("user", "u")], False, "messages[1].role"),
        ([("user", "u"), ("user", "u")], False, "messages[1].role"),
        ([("user", "u"), ("assistant", "a"), ("assistant", "a"), ("user", "u")], False, "messages[2].role"),
        ([("user", "u"), ("assistant", "a")], False, "messages[1].role"),
        ([("system", "s")], False, "messages[0].role"),
        ([("user", "")], False, "messages[0].content"),
        ([("system", "s"), ("user", " \n\t ")], False, "messages[1].content"),
        ([("user", "u"), ("assistant", "a" * 11), ("user", "u")], False, "messages[1].content"),
    ],
)
def test_validation_errors_name_the_field(messages, is_continuation, field):
    with pytest.raises(ChatTemplateError) as err:
        validate_messages(messages, max_message_chars=10, is_continuation=is_continuation)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


def test_error_messages_never_echo_the_content():
    secret = "top secret prompt text"
    with pytest.raises(ChatTemplateError) as err:
        validate_messages([("user", secret), ("user", secret)], max_message_chars=5)
    assert secret not in str(err.value)
