"""IncrementalDetokenizer against full decodes, on real (locally trained) HF tokenizers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.engine.detokenizer import (
    IncrementalDetokenizer,
    check_stop_strings,
    stop_holdback_len,
)
from jaxpaged.sampling_params import SamplingParams
from tests.tokenizer_utils import (
    CORPUS,
    build_byte_fallback_tokenizer,
    build_byte_level_tokenizer,
)

TOKENIZERS = {
    "byte_level": build_byte_level_tokenizer,
    "byte_fallback": build_byte_fallback_tokenizer,
}


def _stream(tokenizer, prompt_ids, output_ids, params=None, delta=False):
    """Feeds output_ids one token per step; returns (final text, concatenated deltas)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params or SamplingParams())
    pieces = []
    for i, token_id in enumerate(output_ids):
        finished = i == len(output_ids) - 1
        stop = detok.update([token_id], finished)
        pieces.append(detok.get_next_output_text(finished or stop is not None, delta=True))
        if stop is not None:
            break
    return detok.output_text, "".join(pieces)


def _expected(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip_special_tokens)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
    assert full.startswith(prompt)
    return full[len(prompt) :]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_byte_level_streams_match_full_decode(data):
    tok = build_byte_level_tokenizer()
    prompt_ids = tok.encode(data.draw(st.sampled_from(CORPUS)), add_special_tokens=False)
    # Any id, special tokens and lone UTF-8 continuation bytes included.
    output_ids = data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=40))
    skip = data.draw(st.booleans())
    params = SamplingParams(skip_special_tokens=skip)
    text, deltas = _stream(tok, prompt_ids, output_ids, params)
    assert text == _expected(tok, prompt_ids, output_ids, skip)
    assert deltas == text


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_text_streams_match_full_decode(data):
    """Token streams of real text (both tokenizers): multi-byte characters split across
    byte tokens and '▁' spaces must come out exactly as a full decode."""
    name = data.draw(st.sampled_from(sorted(TOKENIZERS)))
    tok = TOKENIZERS[name]()
    alphabet = st.sampled_from(list("abc XYZ.,!\néçü日本🙂🚀∑ΩпЖ"))
    prompt_ids = tok.encode(data.draw(st.text(alphabet, min_size=1, max_size=10)))
    output_text = data.draw(st.text(alphabet, min_size=1, max_size=30))
    output_ids = tok.encode(output_text, add_special_tokens=False)
    text, deltas = _stream(tok, prompt_ids, output_ids)
    assert text == _expected(tok, prompt_ids, output_ids)
    assert deltas == text


def test_multibyte_character_waits_for_its_last_byte():
    tok = build_byte_fallback_tokenizer()
    ids = tok.encode("🙂", add_special_tokens=False)
    byte_ids = [i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) == 4  # the emoji falls back to its four UTF-8 bytes
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), SamplingParams())
    seen = []
    for token_id in ids:
        detok.update([token_id], finished=False)
        seen.append(detok.get_next_output_text(False, delta=True))
    assert "".join(seen).strip() == "🙂"
    assert all("\ufffd" not in s for s in seen)


def test_first_output_token_keeps_its_leading_space():
    tok = build_byte_fallback_tokenizer()
    prompt = tok.encode("Hello there,")
    out = tok.encode("world", add_special_tokens=False)  # "▁world"
    assert tok.convert_ids_to_tokens(out[0]).startswith("▁")
    assert tok.decode(out) == "world"  # a decode of the output alone loses the space
    text, _ = _stream(tok, prompt, out)
    assert text.startswith(" ")
    assert text == _expected(tok, prompt, out)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(skip):
    tok = build_byte_level_tokenizer()
    out = tok.encode("Hello", add_special_tokens=False) + [tok.eos_token_id]
    out += tok.encode(" world", add_special_tokens=False)
    text, _ = _stream(tok, tok.encode("Hi"), out, SamplingParams(skip_special_tokens=skip))
    assert text == ("Hello world" if skip else "Hello<|im_end|> world")


def test_check_stop_strings():
    assert check_stop_strings("abc STOP", 2, ["STOP"], False) == ("STOP", 4)
    assert check_stop_strings("abc STOP", 2, ["STOP"], True) == ("STOP", -1)
    assert check_stop_strings("abc STOPxy", 3, ["STOP"], True) == ("STOP", 8)
    # Wholly inside old text: an earlier step would have found it.
    assert check_stop_strings("STOP and more", 3, ["STOP"], False) is None
    # Earliest match wins among several stop strings.
    assert check_stop_strings("a##b!!", 6, ["!!", "##"], False) == ("##", 1)
    assert check_stop_strings("abc", 0, ["abc"], False) is None


def test_stop_holdback_len():
    assert stop_holdback_len("hello ST", ["STOP"]) == 2
    assert stop_holdback_len("hello S", ["STOP", "xx"]) == 1
    assert stop_holdback_len("hello", ["STOP"]) == 0
    assert stop_holdback_len("hello STOP", ["STOP"]) == 0  # full matches are cut, not held
    assert stop_holdback_len("aaa", ["aaab"]) == 3


def _char_ids(tok, text):
    """One token per character, so a stop string is split over several tokens."""
    return [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(include):
    tok = build_byte_level_tokenizer()
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=include)
    ids = _char_ids(tok, "abc STOP def")
    detok = IncrementalDetokenizer(tok, tok.encode("x"), params)
    stops = [detok.update([token_id], finished=False) for token_id in ids[: len("abc STOP")]]
    # Found on the token that completed it, not before.
    assert stops == [None] * (len("abc STOP") - 1) + ["STOP"]
    assert detok.output_text == ("abc STOP" if include else "abc ")


def test_delta_mode_holds_back_possible_stop_prefix():
    tok = build_byte_level_tokenizer()
    params = SamplingParams(stop=["STOP"], output_kind="delta")
    detok = IncrementalDetokenizer(tok, tok.encode("x"), params)
    deltas = []
    for token_id in _char_ids(tok, "ab STa ST"):
        detok.update([token_id], finished=False)
        deltas.append(detok.get_next_output_text(False, delta=True))
    # "ST" could still become "STOP": held back; "STa" cannot, so it was released.
    assert "".join(deltas) == "ab STa "
    for token_id in _char_ids(tok, "OP"):
        stop = detok.update([token_id], finished=False)
    assert stop == "STOP"
    assert detok.get_next_output_text(True, delta=True) == ""
    assert detok.output_text == "ab STa "


def test_min_tokens_delays_stop_strings():
    tok = build_byte_level_tokenizer()
    params = SamplingParams(stop=["a"], min_tokens=3, max_tokens=10)
    detok = IncrementalDetokenizer(tok, tok.encode("x"), params)
    stops = [detok.update([t], finished=False) for t in _char_ids(tok, "aaaa")]
    assert stops == [None, None, None, "a"]
