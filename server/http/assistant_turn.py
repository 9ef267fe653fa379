"""An assistant turn as /v1/chat/completions returns it: the model's text with a reasoning model's thinking split
off (server/reasoning.py) and tool calls parsed out (server/tool_calls.py), whole or as stream deltas; and the
grammar a forced tool call or a reasoning model's request needs before it is sent."""
import dataclasses

from server.http.protocol import ApiError, ChatRequest
from server.reasoning import ReasoningParser, ReasoningStream
from server.sampling import SamplingParams
from server.tool_calls import ToolCallStream, forced_call_grammar


@dataclasses.dataclass
class AssistantTurn:
    tools: object | None                 # a tool-call parser (server/tool_calls.py make_parser), None: no tools
    reasoning: ReasoningParser | None
    parallel_tool_calls: bool = True

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The whole turn's message and finish reason."""
        thought, text = self.reasoning.split(text) if self.reasoning else (None, text)
        message = {"role": "assistant", "content": text}
        content, calls = self.tools.parse(text) if self.tools else (text, [])
        if calls:
            message = {"role": "assistant", "content": content or None,
                       "tool_calls": [call.as_openai() for call in self.kept_calls(calls)]}
            finish_reason = "tool_calls"
        if thought is not None:
            message["reasoning_content"] = thought
        return message, finish_reason

    def stream(self) -> "AssistantTurnStream":
        return AssistantTurnStream(self)

    def kept_calls(self, calls: list) -> list:
        """All the calls, or with parallel_tool_calls off the first."""
        return calls if self.parallel_tool_calls else calls[:1]


class AssistantTurnStream:
    """One choice's text deltas in; its chunks' deltas out, each (delta, finish_reason)."""

    def __init__(self, turn: AssistantTurn):
        self.turn = turn
        self.thinking = ReasoningStream(turn.reasoning) if turn.reasoning else None
        self.calls = ToolCallStream(turn.tools) if turn.tools else None

    def feed(self, text: str, finished: bool, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        deltas = []
        if self.thinking:
            thought, text = self.thinking.feed(text, finished)
            if thought:
                deltas.append(({"reasoning_content": thought}, None))
        if self.calls is None:
            if text or finished or not self.thinking:
                deltas.append(({"content": text} if text or not finished else {}, finish_reason))
            return deltas
        text, calls = self.calls.feed(text, finished)
        if text:
            deltas.append(({"content": text}, None))
        if finished:
            deltas += [({"tool_calls": [call.as_openai(i)]}, None) for i, call in enumerate(self.turn.kept_calls(calls))]
            deltas.append(({}, "tool_calls" if calls else finish_reason))
        return deltas


def constrained_params(req: ChatRequest, params: SamplingParams, tool_parser: str,
                       think_end: int | None) -> SamplingParams:
    """params with the grammar a forced tool call needs (tool_choice required or named), armed after the end of
    the reasoning (think_end, the </think> token) when a reasoning parser is on."""
    if req.tool_choice in ("required", "named"):
        forced = [t for t in req.tools if req.tool_choice == "required" or t.name == req.named_tool]
        try:
            grammar = forced_call_grammar(tool_parser, forced, req.parallel_tool_calls and req.tool_choice == "required")
        except ValueError as e:
            raise ApiError(400, f"tools: {e}", "tools") from None
        params = dataclasses.replace(params, structured_output=grammar)
    if think_end is not None and params.structured_output is not None:
        params = dataclasses.replace(params, structured_output=dataclasses.replace(
            params.structured_output, start_after=think_end))
    return params
