"""Tool calling: the formats models write calls in, parsed into OpenAI tool_calls, streamed, and forced.

Three formats cover our architectures' instruct models:
  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call (Qwen2.5, Hermes;
               also what a model whose chat template knows no tools is prompted with, by hermes_system_prompt)
  llama3_json  {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, calls joined by ";" (Llama 3.1+)
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (the marker is a control token, so it may be
               missing from the text: a bare array of calls is read the same way)
Text that does not parse as calls stays content. tool_choice "required" or a named function is enforced with a
grammar (forced_call_grammar), so the output always parses and its arguments validate against the parameters.
"""
import json
import re
import uuid
from dataclasses import dataclass, field

from server.outputs import partial_suffix
from server.sampling import StructuredOutput
from server.structured_output import closed_schema


@dataclass
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict | None = None      # a JSON schema of the arguments object

    def as_openai(self) -> dict:
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass
class ToolCall:
    name: str
    arguments: str                      # a JSON object's text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")   # Mistral's templates want 9 characters

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class _Parser:
    """What the formats share: which names are tools (a call to any other name is content), and call ids."""

    def __init__(self, tool_names=None):
        self.tool_names = None if tool_names is None else frozenset(tool_names)

    def _call(self, obj, arguments_key: str) -> ToolCall | None:
        """obj as a call: {"name": a tool's name, arguments_key (or "arguments"): an object or its JSON text}."""
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        if self.tool_names is not None and obj["name"] not in self.tool_names:
            return None
        arguments = obj.get(arguments_key, obj.get("arguments"))
        if isinstance(arguments, str):   # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), **self._id())

    def _id(self) -> dict:
        return {}


def _json_values(text: str) -> list | None:
    """Consecutive JSON values in text, separated by whitespace or ';'; None unless all of it parses."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


class HermesParser(_Parser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls, first, last = [], None, 0
        for m in self._BLOCK.finditer(text):
            values = _json_values(m.group(1))
            call = self._call(values[0], "arguments") if values and len(values) == 1 else None
            if call is None:
                continue
            first = m.start() if first is None else first
            calls.append(call)
            last = m.end()
        if not calls:
            return text, []
        return _content(text[:first] + text[last:]), calls

    def content_end(self, text: str) -> int:
        """How much of text is content whatever follows (the rest may begin a call)."""
        start = text.find(self.START)
        return _settled(text, start if start >= 0 else len(text) - partial_suffix(text, [self.START]))


class Llama3JsonParser(_Parser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix(self.TAG)
        values = _json_values(body) if body.lstrip().startswith("{") else None
        calls = [self._call(v, "parameters") for v in values or []]
        if not calls or None in calls:
            return text, []
        return "", calls

    def content_end(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(self.TAG) or self.TAG.startswith(head):
            return 0   # may be a call: held until the output ends
        return len(text)


class MistralParser(_Parser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"

    def _id(self) -> dict:
        return {"id": uuid.uuid4().hex[:9]}   # Mistral's chat templates refuse other ids in the history

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        at = text.find(self.MARKER)
        head, body = (text[:at], text[at + len(self.MARKER):]) if at >= 0 else ("", text)
        values = _json_values(body) if body.strip().startswith("[") else None
        if not values or len(values) != 1 or not isinstance(values[0], list):
            return text, []
        calls = [self._call(v, "arguments") for v in values[0]]
        if not calls or None in calls:
            return text, []
        return _content(head), calls

    def content_end(self, text: str) -> int:
        at = text.find(self.MARKER)
        if at >= 0:
            return _settled(text, at)
        if text.lstrip().startswith("["):
            return 0
        return _settled(text, len(text) - partial_suffix(text, [self.MARKER]))


def _content(text: str) -> str:
    """The content beside calls: nothing when it is only whitespace."""
    return text if text.strip() else ""


def _settled(text: str, end: int) -> int:
    """end, unless text[:end] is only whitespace (which is no content at all if calls follow): then 0."""
    return end if text[:end].strip() else 0


_PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
PARSERS = tuple(_PARSERS)


def make_parser(name: str, tool_names=None):
    """tool_names: the request's tools (a call to another name stays content); None accepts any name."""
    return _PARSERS[name](tool_names)


def parser_for_template(chat_template: str | None) -> str:
    """The format a chat template teaches its model; hermes when it names none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "parameters" in template):
        return "llama3_json"
    return "hermes"


class ToolCallStream:
    """One choice's text deltas in, content deltas and (when the output ends) its tool calls out."""

    def __init__(self, parser):
        self.parser = parser
        self.text = ""
        self.sent = 0    # characters of content already sent

    def feed(self, delta: str, finished: bool) -> tuple[str, list[ToolCall]]:
        self.text += delta
        if not finished:
            end = self.parser.content_end(self.text)
            out, self.sent = self.text[self.sent:end], max(self.sent, end)
            return out, []
        content, calls = self.parser.parse(self.text)
        rest = content[self.sent:] if content.startswith(self.text[:self.sent]) else ""
        self.sent = len(self.text)
        return rest, calls


def hermes_system_prompt(tools: list[FunctionTool]) -> str:
    """What a model whose template knows no tools is told (the Hermes function-calling prompt, shortened)."""
    listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False, separators=(",", ":")) for t in tools)
    return (f"You may call functions to help with the user's request. Their signatures:\n<tools>\n{listed}\n</tools>\n"
            "For each call, reply with a JSON object of the function's name and arguments in <tool_call></tool_call> "
            'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def prompt_messages(messages: list[dict], tools: list[FunctionTool], template_knows_tools: bool
                    ) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to render. A template that knows tools gets them as they are; for one that does
    not, the tools are described in the system turn (hermes_system_prompt), earlier calls become <tool_call>
    blocks in their assistant turns, and tool results user turns in <tool_response> tags."""
    if template_knows_tools:
        return messages, [t.as_openai() for t in tools] or None
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [f'<tool_call>\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)}\n</tool_call>'
                      for c in calls]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + blocks)
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_responses"):   # one user turn for a run of results: roles alternate
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{response}"}
                continue
            m = {"role": "user", "content": response, "tool_responses": True}
        out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_responses"} for m in out]
    if tools:
        prompt = hermes_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def forced_call_grammar(parser_name: str, tools: list[FunctionTool], parallel: bool) -> StructuredOutput:
    """A grammar whose every output is one call (or, with parallel, one or more) of these tools in the
    parser's format, its arguments valid against the tool's parameters (each schema its own root, so its
    $refs resolve). ValueError for parameters nested too deeply."""
    key = "parameters" if parser_name == "llama3_json" else "arguments"
    rules = []
    for i, t in enumerate(tools):
        schema = closed_schema(t.parameters or {"type": "object"}) | {"x-guidance": {"whitespace_flexible": False}}
        head = json.dumps(f'{{"name": {json.dumps(t.name)}, "{key}": ')
        rules.append(f"tool{i}: {head} %json {json.dumps(schema)} \"}}\"")
    call = " | ".join(f"tool{i}" for i in range(len(tools)))
    if parser_name == "hermes":
        top = 'start: hermes ("\\n" hermes)*' if parallel else "start: hermes"
        top += '\nhermes: "<tool_call>\\n" call "\\n</tool_call>"'
    elif parser_name == "llama3_json":
        top = 'start: call ("; " call)*' if parallel else "start: call"
    else:
        top = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
    return StructuredOutput("grammar", "\n".join([top, f"call: {call}", *rules]) + "\n", "tool_choice")
