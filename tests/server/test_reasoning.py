"""Reasoning parsers on canned outputs, whole and streamed one character at a time."""
import pytest

from server.reasoning import ReasoningParser, ReasoningStream

CASES = [   # (parser, output, reasoning, content)
    ("deepseek_r1", "Let me think.\nTwo plus two.\n</think>\n\nThe answer is 4.", "Let me think.\nTwo plus two.\n",
     "\n\nThe answer is 4."),
    ("deepseek_r1", "<think>Hmm.</think>Four.", "Hmm.", "Four."),
    ("deepseek_r1", "Still thinking about </thi", "Still thinking about </thi", ""),   # cut off: all reasoning
    ("deepseek_r1", "</think>{\"a\": 1}", "", "{\"a\": 1}"),
    ("qwen3", "<think>\nWeigh it.\n</think>\n\nHeavy.", "\nWeigh it.\n", "\n\nHeavy."),
    ("qwen3", "No thinking here, <think> later is text.", None, "No thinking here, <think> later is text."),
    ("qwen3", "  <think>cut off", "cut off", ""),
    ("qwen3", "<thin", None, "<thin"),
]


@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_split(name, text, reasoning, content):
    assert ReasoningParser(name).split(text) == (reasoning, content)


@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_streaming_one_character_at_a_time_assembles_the_same(name, text, reasoning, content):
    stream = ReasoningStream(ReasoningParser(name))
    got_reasoning = got_content = ""
    for i, ch in enumerate(text):
        r, c = stream.feed(ch, i == len(text) - 1)
        got_reasoning += r
        got_content += c
        assert "</think>" not in got_reasoning + got_content
    assert got_reasoning == (reasoning or "") and got_content == content


def test_unknown_parser():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        ReasoningParser("o1")
