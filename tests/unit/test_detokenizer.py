"""Streaming detokenizer: byte-fallback UTF-8, parity with tokenizer.decode, stop strings."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from worker.detokenizer import TokenDecoder, piece_bytes

MULTI_BYTE = [
    "café",
    "naïve résumé",
    "Ελληνικά γράμματα",
    "日本語のテキスト",
    "emoji 😀👍🏽 done",
    "mixé 世界 😀 end",
]
ORDINARY = [
    "Hello world, this is a tiny tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog. Sure, here is an answer!",
    "Line one\nline two\n\n  indented  text with   spaces",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tiny checkpoint's Llama-2-style tokenizer: byte-fallback BPE, <0x00>..<0xFF> at ids 3..258."""
    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def decoder(tokenizer):
    return TokenDecoder.from_tokenizer(tokenizer, len(tokenizer) + 5)


def _push_all(stream, token_ids) -> list[str]:
    return [stream.push(t) for t in token_ids]


def test_piece_bytes():
    assert piece_bytes("\u2581Hello") == b" Hello"
    assert piece_bytes("<0x0A>") == b"\n"
    assert piece_bytes("<0xE4>") == b"\xe4"
    assert piece_bytes("é") == "é".encode()


def test_table_from_tokenizer(tokenizer, decoder):
    assert decoder.vocab_size == len(tokenizer) + 5
    assert decoder.pieces[3] == b"\x00" and decoder.pieces[258] == b"\xff"
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        assert decoder.pieces[special] == b""
    assert all(p == b"" for p in decoder.pieces[len(tokenizer) :])
    pieces = tokenizer.convert_ids_to_tokens(list(range(259, len(tokenizer))))
    word_id, word = next((i, p) for i, p in enumerate(pieces, 259) if p.startswith("\u2581") and len(p) > 1)
    assert decoder.pieces[word_id] == b" " + word[1:].encode()


def test_special_and_out_of_table_tokens_produce_no_text(tokenizer, decoder):
    stream = decoder.stream(())
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, len(tokenizer) + 1]
    assert _push_all(stream, ids) == [""] * 4
    assert stream.flush() == ""
    assert stream.text == ""


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_multi_byte_text_is_released_whole(tokenizer, decoder, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = decoder.stream(())
    deltas = _push_all(stream, ids) + [stream.flush()]
    assert "".join(deltas) == stream.text == " " + text
    assert stream.text == b"".join(decoder.pieces[t] for t in ids).decode()
    assert all("\ufffd" not in d for d in deltas)


def test_cjk_bytes_are_held_until_the_character_is_complete(tokenizer, decoder):
    ids = tokenizer.encode("世", add_special_tokens=False)
    byte_ids = [t for t in ids if len(decoder.pieces[t]) == 1 and decoder.pieces[t][0] >= 0x80]
    assert len(byte_ids) == 3
    stream = decoder.stream(())
    assert _push_all(stream, byte_ids) == ["", "", "世"]


@pytest.mark.parametrize("text", ORDINARY + MULTI_BYTE)
def test_stream_matches_tokenizer_decode_of_a_continuation(tokenizer, decoder, text):
    full = tokenizer(text)["input_ids"]
    for split in range(2, len(full)):
        prompt, out = full[:split], full[split:]
        prefix = tokenizer.decode(prompt, skip_special_tokens=True)
        whole = tokenizer.decode(full, skip_special_tokens=True)
        if "\ufffd" in prefix:
            continue  # the prompt ends inside a multi-byte character
        stream = decoder.stream(())
        released = "".join(_push_all(stream, out)) + stream.flush()
        assert released == whole[len(prefix) :], split


@pytest.mark.parametrize("text", ORDINARY + MULTI_BYTE)
def test_skip_leading_space_matches_decode_from_the_start(tokenizer, decoder, text):
    ids = tokenizer(text)["input_ids"]
    stream = decoder.stream((), skip_leading_space=True)
    released = "".join(_push_all(stream, ids)) + stream.flush()
    assert released == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_stop_string_split_across_tokens_never_leaks(tokenizer, decoder):
    text = "Hello world, this is a tiny tokenizer for tests."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = decoder.stream(("tiny tok",))
    deltas = []
    for t in ids:
        deltas.append(stream.push(t))
        assert "tiny" not in stream.text
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(deltas) == stream.text == " Hello world, this is a "
    assert stream.push(ids[-1]) == "" and stream.flush() == ""
    assert stream.text == " Hello world, this is a "


def test_earliest_stop_string_wins(tokenizer, decoder):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    stream = decoder.stream(("lazy", "fox jumps", "quick brown fox"))
    _push_all(stream, ids)
    assert stream.stopped
    assert stream.text == " The "


def test_held_back_partial_stop_is_released_by_flush(tokenizer, decoder):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    stream = decoder.stream(("world!",))
    released = "".join(_push_all(stream, ids))
    assert released == " Hello "
    assert stream.flush() == "world"
    assert not stream.stopped
    assert stream.text == " Hello world"


def _synthetic(*pieces: bytes) -> TokenDecoder:
    return TokenDecoder(list(pieces))


def test_partial_stop_is_released_once_ruled_out():
    stream = _synthetic(b"wor", b"ld", b"m").stream(("worm",))
    assert stream.push(0) == ""
    assert stream.push(1) == "world"
    assert not stream.stopped


def test_overlapping_stops_completed_by_one_token_cut_at_the_earliest_start():
    stream = _synthetic(b"xa", b"bcd").stream(("bc", "abcd"))
    assert stream.push(0) == "x"
    assert stream.push(1) == ""
    assert stream.stopped and stream.text == "x"


def test_stop_string_made_of_multi_byte_characters_split_into_bytes():
    table = _synthetic(b"ok ", b"\xe4", b"\xb8", b"\x96", b"\xe7", b"\x95", b"\x8c")
    stream = table.stream(("世界",))
    deltas = _push_all(stream, [0, 1, 2, 3, 4, 5, 6])
    assert "".join(deltas) == stream.text == "ok "
    assert stream.stopped


def test_incomplete_utf8_at_the_end_becomes_replacement_character():
    stream = _synthetic(b"a", b"\xe4", b"\xb8").stream(())
    assert _push_all(stream, [0, 1, 2]) == ["a", "", ""]
    assert stream.flush() == "\ufffd"
    assert stream.text == b"a\xe4\xb8".decode(errors="replace")


_PIECES = [b"", b"a", b"b", b" ", b"ab", b"\xc3", b"\xa9", b"\xc3\xa9"]  # ASCII and 2-byte é pieces
_PIECES += [b"\xe4\xb8", b"\x96", b"\xf0\x9f", b"\x98\x80"]  # 3-byte 世 and 4-byte 😀 fragments


def _reference(pieces: list[bytes], stops: tuple[str, ...]) -> str:
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for piece in [*pieces, None]:
        text += utf8.decode(b"", final=True) if piece is None else utf8.decode(piece)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)]
    return text


@given(
    ids=st.lists(st.integers(0, len(_PIECES) - 1), max_size=40),
    stops=st.lists(st.text(alphabet="ab é世😀\ufffd", min_size=1, max_size=4), max_size=3),
)
def test_deltas_match_a_whole_text_reference(ids, stops):
    stream = _synthetic(*_PIECES).stream(tuple(stops))
    deltas = []
    for t in ids:
        deltas.append(stream.push(t))
        assert stream.text == "".join(deltas)
    deltas.append(stream.flush())
    assert "".join(deltas) == stream.text == _reference([_PIECES[t] for t in ids], tuple(stops))
    if not stops:
        assert stream.text == b"".join(_PIECES[t] for t in ids).decode(errors="replace")
