"""Reasoning models: the <think>...</think> part of an output, split off as reasoning_content.

  deepseek_r1  the chat template opens <think> in the prompt, so the output starts inside the reasoning (a
               leading <think> is dropped too); everything up to </think> is reasoning
  qwen3        reasoning only when the output opens with <think>; without it (thinking switched off) the whole
               output is content
An output cut off before </think> is all reasoning. A grammar (response_format, a forced tool call) applies only
after the reasoning: the engine arms it at the </think> token (StructuredOutput.start_after).
"""
from server.outputs import partial_suffix

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, name: str):
        if name not in PARSERS:
            raise ValueError(f"reasoning parser must be one of {', '.join(PARSERS)}; got {name!r}")
        self.name = name

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole output."""
        head = text.lstrip()
        opened = head.startswith(START)
        if self.name == "qwen3" and not opened:
            return None, text
        body = head[len(START):] if opened else text
        reasoning, ended, content = body.partition(END)
        return reasoning, content if ended else ""


class ReasoningStream:
    """One choice's text deltas in, (reasoning delta, content delta) out; assembles to ReasoningParser.split."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, finished: bool) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self.parser.split(self.text)
        if not finished:
            if START.startswith(self.text.lstrip()):
                return "", ""   # may still open with <think>
            if reasoning is not None and END not in self.text:
                reasoning = reasoning[:len(reasoning) - partial_suffix(reasoning, [END])]   # may be </think> begun
        reasoning = reasoning or ""
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = max(self.sent_reasoning, len(reasoning)), len(content)
        return out
