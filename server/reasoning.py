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
    """One choice's text deltas in, (reasoning delta, content delta) out; assembles to ReasoningParser.split. Each
    delta costs its own length (plus a held-back partial </think>), however long the output grows."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.start = ""          # the output until it is known whether it opens with <think>
        self.mode = None         # "reasoning" or "content", once known
        self.held = ""           # reasoning that may be the beginning of </think>

    def feed(self, delta: str, finished: bool) -> tuple[str, str]:
        if self.mode is None:
            self.start += delta
            head = self.start.lstrip()
            if START.startswith(head) and not finished:
                return "", ""   # may still open with <think>
            opened = head.startswith(START)
            self.mode = "reasoning" if opened or self.parser.name == "deepseek_r1" else "content"
            delta = head[len(START):] if opened else self.start
        if self.mode == "content":
            return "", delta
        pending = self.held + delta
        end = pending.find(END)
        if end >= 0:
            self.mode, self.held = "content", ""
            return pending[:end], pending[end + len(END):]
        keep = 0 if finished else partial_suffix(pending, [END])
        self.held = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], ""
