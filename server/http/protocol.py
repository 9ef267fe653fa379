"""OpenAI protocol: parse and validate /v1/completions and /v1/chat/completions bodies into engine inputs.

Every mistake raises ApiError naming the field and what is allowed; nothing here calls the engine.
"""
import json
import re
from dataclasses import dataclass, field

from server.config import DEFAULT_MAX_CHOICES  # noqa: F401 (the routes' default, --max-choices-per-request)
from server.errors import ModelNotFoundError, status_of
from server.sampling import ANY_OBJECT_SCHEMA, GRAMMAR_KINDS, InvalidRequestError, SamplingParams, StructuredOutput
from server.tool_calls import FunctionTool

MAX_N = 16
RATE_CHARGE = "lmserve.rate_charge"   # scope key: takes more turns of the caller's rate limit, or raises its 429
AUDIT_DETAILS = "lmserve.audit_details"   # scope key: what a route adds to its audit-log entry (adapter, path)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_BODY_BYTES = 4 * 2**20   # a request body larger than this is refused before it is parsed
BODY_TIMEOUT_S = 30           # a request body not complete this long after its headers is refused (408)
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(message: str, param: str = "model") -> ApiError:
    """404 for a model or adapter this server does not serve, as OpenAI answers it."""
    return ApiError(404, message, param, "NotFoundError", "model_not_found")


def engine_refusal(e: Exception) -> ApiError | None:
    """The HTTP error for an exception the engine raises about one request (server/errors.py STATUS); None for
    anything else."""
    status = status_of(e)
    if status is None:
        return None
    param = getattr(e, "param", None) or ("model" if isinstance(e, ModelNotFoundError) else None)
    headers = {"Retry-After": "1"} if status.http == 429 else None
    return ApiError(status.http, str(e), param, status.type, status.code, headers)


@dataclass
class CompletionRequest:
    model: str | None          # None: the base model
    prompts: list[str | list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    parse_special_tokens: bool   # control-token strings in a text prompt become control tokens (off: text)


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    tools: list[FunctionTool] = field(default_factory=list)
    tool_choice: str = "none"            # none | auto | required | named
    named_tool: str | None = None        # with tool_choice "named"
    parallel_tool_calls: bool = True


def parse_completion(body: dict) -> CompletionRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif _is_token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                            "token-id lists (none of them empty)", "prompt")
    logprobs = optional_field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, f"logprobs must be between 0 and 20; got {logprobs}", "logprobs")
    echo = bool(optional_field(body, "echo", bool) or False)
    params = _sampling_params(body, max_tokens=optional_field(body, "max_tokens", int, default=16), logprobs=logprobs,
                              prompt_logprobs=logprobs if echo and logprobs is not None else None)
    stream, include_usage = _stream(body)
    return CompletionRequest(model, prompts, params, _n(body), stream, include_usage, echo,
                             bool(optional_field(body, "parse_special_tokens", bool, default=False)))


def parse_chat(body: dict) -> ChatRequest:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    want_logprobs = bool(optional_field(body, "logprobs", bool) or False)
    top = optional_field(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= 20:
        raise ApiError(400, f"top_logprobs must be between 0 and 20; got {top}", "top_logprobs")
    if top is not None and not want_logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    max_tokens = optional_field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = optional_field(body, "max_tokens", int)
    params = _sampling_params(body, max_tokens=max_tokens, logprobs=(top or 0) if want_logprobs else None)
    stream, include_usage = _stream(body)
    tools = _tools(body)
    tool_choice, named = _tool_choice(body, tools)
    if tool_choice in ("required", "named") and params.structured_output is not None:
        raise ApiError(400, f"tool_choice {tool_choice if tool_choice == 'required' else named!r} forces a tool call, "
                            f"which {params.structured_output.field} would constrain too; send one of them", "tool_choice")
    return ChatRequest(model, parsed, params, _n(body), stream, include_usage, want_logprobs, tools, tool_choice,
                       named, bool(optional_field(body, "parallel_tool_calls", bool, default=True)))


def _tools(body: dict) -> list[FunctionTool]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"tools must be a list of at most {MAX_TOOLS} {{\"type\": \"function\", \"function\": "
                            "{name, description, parameters}} objects", "tools")
    parsed = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{name, description, "
                                "parameters}}}}", where)
        f = tool["function"]
        name = f.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'", f"{where}.function.name")
        if any(t.name == name for t in parsed):
            raise ApiError(400, f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        if not isinstance(f.get("description", ""), (str, type(None))):
            raise ApiError(400, f"{where}.function.description must be a string", f"{where}.function.description")
        if not isinstance(f.get("parameters", {}), (dict, type(None))):
            raise ApiError(400, f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        parsed.append(FunctionTool(name, f.get("description"), f.get("parameters")))
    return parsed


def _tool_choice(body: dict, tools: list[FunctionTool]) -> tuple[str, str | None]:
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": NAME}}', "tool_choice")
    if not any(t.name == name for t in tools):
        raise ApiError(400, f"tool_choice names the function {name[:64]!r}, which is not in tools", "tool_choice")
    return "named", name


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a string role", f"messages[{i}]")
    role = m["role"]
    if role not in ROLES:
        raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role[:40]!r}",
                       f"messages[{i}].role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood by a text model
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"type {kind[:40]!r}" if isinstance(kind, str) else "no type"
                raise ApiError(400, f"messages[{i}].content[{j}] has {what}; this model reads only "
                                    f"{{\"type\": \"text\", \"text\": ...}} parts", f"messages[{i}].content[{j}]")
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}].text must be a string", f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        if role in ("system", "developer", "user"):
            raise ApiError(400, f"messages[{i}] ({role}) has no content", f"messages[{i}].content")
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    # Chat templates know system turns; OpenAI's developer role is the same thing under a newer name.
    message = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant" and m.get("tool_calls") is not None:
        message["tool_calls"] = _history_calls(m["tool_calls"], i)
    if role == "tool" and m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise ApiError(400, f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        message["tool_call_id"] = m["tool_call_id"]
    return message


def _history_calls(calls, i: int) -> list[dict]:
    """An assistant turn's earlier tool calls, with arguments as objects (what chat templates expect)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise ApiError(400, f"{where} must be a list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str) and isinstance(call.get("id", ""), str)):
            raise ApiError(400, f"{where}[{j}] must be {{id, type: function, function: {{name, arguments (a JSON "
                                "string)}}}}", f"{where}[{j}]")
        try:
            arguments = json.loads(function["arguments"])
        except (ValueError, RecursionError):
            arguments = function["arguments"]
        out.append({"id": call.get("id", f"call_{j}"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _sampling_params(body: dict, max_tokens, logprobs, prompt_logprobs=None) -> SamplingParams:
    temperature = optional_field(body, "temperature", (int, float), default=1.0)
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=optional_field(body, "top_p", (int, float), default=1.0),
            top_k=optional_field(body, "top_k", int, default=-1), min_p=optional_field(body, "min_p", (int, float), default=0.0),
            repetition_penalty=optional_field(body, "repetition_penalty", (int, float), default=1.0),
            presence_penalty=optional_field(body, "presence_penalty", (int, float), default=0.0),
            frequency_penalty=optional_field(body, "frequency_penalty", (int, float), default=0.0),
            seed=optional_field(body, "seed", int), stop=body.get("stop"),
            stop_token_ids=optional_field(body, "stop_token_ids", list, default=[]),
            min_tokens=optional_field(body, "min_tokens", int, default=0), ignore_eos=optional_field(body, "ignore_eos", bool, default=False),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=body.get("logit_bias"),
            include_stop_str_in_output=optional_field(body, "include_stop_str_in_output", bool, default=False),
            skip_special_tokens=optional_field(body, "skip_special_tokens", bool, default=True),
            structured_output=structured_output(body))
    except InvalidRequestError as e:
        raise ApiError(400, str(e), e.param) from None


_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}   # vLLM's older names


def structured_output(body: dict) -> StructuredOutput | None:
    """The grammar a request asks for: OpenAI's response_format, or vLLM's structured_outputs / guided_* fields
    (one of them at most)."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None and (spec := _response_format(fmt)) is not None:
        found.append(spec)
    options = body.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "structured_outputs must be an object with one of json, regex, choice, grammar or "
                                "json_object", "structured_outputs")
        unknown = sorted(set(options) - set(GRAMMAR_KINDS) - {"json_object"})
        if unknown:
            raise ApiError(400, f"structured_outputs.{unknown[0][:40]} is not supported; use one of json, regex, "
                                "choice, grammar or json_object", f"structured_outputs.{unknown[0][:40]}")
        given = [k for k, v in options.items() if v is not None and v is not False]
        if len(given) != 1:
            raise ApiError(400, "structured_outputs takes exactly one of json, regex, choice, grammar or json_object; "
                                f"got {len(given)}", "structured_outputs")
        key = given[0]
        if key == "json_object":
            if options[key] is not True:
                raise ApiError(400, "structured_outputs.json_object must be true", "structured_outputs.json_object")
            found.append(StructuredOutput("json", ANY_OBJECT_SCHEMA, "structured_outputs.json_object"))
        else:
            found.append(_spec(key, options[key], f"structured_outputs.{key}"))
    for name, kind in _GUIDED_FIELDS.items():
        if body.get(name) is not None:
            found.append(_spec(kind, body[name], name))
    if len(found) > 1:
        raise ApiError(400, f"{found[0].field} and {found[1].field} both constrain the output; send one of them",
                       found[1].field)
    return found[0] if found else None


def _response_format(fmt) -> StructuredOutput | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", ANY_OBJECT_SCHEMA, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object with name and schema",
                           "response_format.json_schema")
        if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise ApiError(400, "response_format.json_schema.name must be a string and strict a boolean",
                           "response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           "response_format.json_schema.schema")
        return _spec("json", schema, "response_format.json_schema.schema")
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", "response_format.type")


def _spec(kind: str, value, field: str) -> StructuredOutput:
    """value as the request gave it: a JSON schema as an object (or its text), a choice list, a regex or grammar."""
    if kind == "json" and isinstance(value, (dict, bool)):
        try:
            value = json.dumps(value)
        except (ValueError, RecursionError):
            raise ApiError(400, f"{field} is nested too deeply", field) from None
    elif kind == "choice" and isinstance(value, list):
        if not value or not all(isinstance(c, str) and c for c in value):
            raise ApiError(400, f"{field} must be a non-empty list of non-empty strings", field)
        value = json.dumps(value)
    elif not isinstance(value, str):
        what = {"json": "a JSON schema object", "choice": "a list of strings"}.get(kind, "a string")
        raise ApiError(400, f"{field} must be {what}", field)
    try:
        return StructuredOutput(kind, value, field)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), e.param) from None


def _model(body: dict) -> str | None:
    """None when the request names no model: the base model serves it, as in vLLM."""
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be the name of a served model (see GET /v1/models)", "model")
    return model


def _n(body: dict) -> int:
    n = optional_field(body, "n", int, default=1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}; got {n}", "n")
    return n


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(optional_field(body, "stream", bool, default=False))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    return stream, include_usage


_TYPE_NAMES = {int: "an integer", bool: "a boolean", list: "a list", (int, float): "a number"}


def optional_field(body: dict, name: str, kind, default=None):
    """body[name] checked to be of kind (bool, int, list, or (int, float) for a number); default when absent."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind == (int, float):
        ok = _is_number(value)
    if not ok:
        raise ApiError(400, f"{name} must be {_TYPE_NAMES[kind]}; got {type(value).__name__}", name)
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_token_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
