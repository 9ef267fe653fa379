"""RequestOutput (the deltas generate() yields), StopStringMatcher (text stops) and partial_suffix (the held-back
tail that may still become a marker)."""
from dataclasses import dataclass, field

from server.sampling import SampledToken


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]                 # new this delta
    text: str                            # new text this delta
    logprobs: list[SampledToken] | None  # per new token, when the request asked for logprobs
    finished: bool
    finish_reason: str | None            # "stop" | "length" | "abort" on the last delta
    num_prompt_tokens: int
    num_cached_tokens: int               # prompt tokens served from the prefix cache
    num_output_tokens: int               # so far
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any
    prompt_logprobs: list[SampledToken | None] | None = None  # on the first delta, when asked: None for token 0
    prompt_token_ids: list[int] | None = None  # on the first delta


@dataclass
class StopStringMatcher:
    """Finds stop strings in the output text and holds back a tail that may still become one."""
    stops: list[str]
    include_stop: bool = False
    emitted: int = 0                     # characters of the text already handed out
    matched: str | None = field(default=None)

    def feed(self, text: str, final: bool) -> str:
        """text is the whole output so far; returns what may be emitted now."""
        if self.matched is not None:
            return ""
        if self.stops:
            start = max(0, self.emitted - max(map(len, self.stops)) + 1)
            hits = [(text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.matched = s
                return self._take(text, i + len(s) if self.include_stop else i)
        if final or not self.stops:
            return self._take(text, len(text))
        return self._take(text, len(text) - self._partial_tail(text))

    def _partial_tail(self, text: str) -> int:
        return partial_suffix(text, self.stops)

    def _take(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        out = text[self.emitted:end]
        self.emitted = end
        return out


def partial_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of text that is the beginning of one of markers (held back while it may still
    become one: a stop string, a tool call's opening tag, the end of a model's reasoning)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
