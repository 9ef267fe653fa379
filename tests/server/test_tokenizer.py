"""Incremental detokenization (multi-byte characters split across tokens), chat template, stop strings."""
from server.outputs import StopStringMatcher
from server.tokenizer import IncrementalDetokenizer, encode_chat, load_tokenizer, render_chat


def test_incremental_text_equals_full_decode_with_multibyte_characters(llama):
    tok = load_tokenizer(llama)
    text = "Zürich 東京 😀🚀 naïve café, numbers 2048!"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:")
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.step([t]) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens carried only part of a character


def test_byte_fallback_of_a_single_emoji_is_held_until_complete(llama):
    tok = load_tokenizer(llama)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([t]) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


def test_an_output_ending_inside_a_character_ends_as_decode_of_the_whole_output(llama):
    tok = load_tokenizer(llama)
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert deltas[-2] == "" and "".join(deltas) == tok.decode(ids) and detok.text.endswith("\ufffd")


def test_chat_template_renders_messages_with_exactly_one_bos(llama):
    tok = load_tokenizer(llama)
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, messages) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_chat(tok, messages)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == render_chat(tok, messages)


def test_stop_matcher_holds_back_a_partial_match_and_cuts_at_the_stop():
    m = StopStringMatcher(["END"])
    assert m.feed("abc E", final=False) == "abc "
    assert m.feed("abc EN", final=False) == ""
    assert m.feed("abc ENX", final=False) == "ENX"
    assert m.feed("abc ENX fooEND tail", final=False) == " foo"
    assert m.matched == "END" and m.feed("abc ENX fooEND tail more", final=True) == ""


def test_stop_matcher_can_include_the_stop_and_flushes_at_the_end():
    m = StopStringMatcher(["\n\n"], include_stop=True)
    assert m.feed("a\n", final=False) == "a"
    assert m.feed("a\n\nb", final=False) == "\n\n"
    plain = StopStringMatcher(["zz"])
    assert plain.feed("xyz", final=False) == "xy" and plain.feed("xyz", final=True) == "z"
