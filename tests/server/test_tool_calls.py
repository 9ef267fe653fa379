"""Tool-call parsers on canned model outputs, whole and streamed one character at a time; the forced-call grammar;
the prompt for templates that know no tools."""
import json

import pytest

from server.tool_calls import (FunctionTool, ToolCallStream, forced_call_grammar, make_parser, parser_for_template,
                               prompt_messages)

WEATHER = {"city": "Paris", "unit": "c"}
SUM = {"a": 1, "b": [2, 3]}

# (parser, model output, expected content, expected [(name, arguments)])
CANNED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     "", [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "sum", "arguments": {"a": 1, "b": [2, 3]}}\n</tool_call>',
     "Let me check.\n", [("get_weather", WEATHER), ("sum", SUM)]),
    ("hermes", '<tool_call>{"name": "sum", "arguments": {"a": 1, "b": [2, 3]}}', "", [("sum", SUM)]),  # no end tag
    ("hermes", "Plain answer with a < sign and <tool but no call.", "Plain answer with a < sign and <tool but no call.", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "",
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
                    '{"name": "sum", "parameters": {"a": 1, "b": [2, 3]}}', "", [("get_weather", WEATHER), ("sum", SUM)]),
    ("llama3_json", '{"name": "sum", "arguments": "{\\"a\\": 1, \\"b\\": [2, 3]}"}', "", [("sum", SUM)]),
    ("llama3_json", "The answer is {braces} in text.", "The answer is {braces} in text.", []),
    ("llama3_json", '{"name": "sum", "parameters": {"a": 1}', '{"name": "sum", "parameters": {"a": 1}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                '{"name": "sum", "arguments": {"a": 1, "b": [2, 3]}}]', "", [("get_weather", WEATHER), ("sum", SUM)]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "sum", "arguments": {"a": 1, "b": [2, 3]}}]', "Sure.", [("sum", SUM)]),
    ("mistral", '[{"name": "sum", "arguments": {"a": 1, "b": [2, 3]}}]', "", [("sum", SUM)]),   # marker skipped
    ("mistral", "[1, 2] is a list, not a call.", "[1, 2] is a list, not a call.", []),
    ("mistral", "No calls [TOOL here.", "No calls [TOOL here.", []),
]


def _as_pairs(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, text, content, calls", CANNED)
def test_canned_outputs_parse(parser, text, content, calls):
    got_content, got_calls = make_parser(parser).parse(text)
    assert got_content == content and _as_pairs(got_calls) == calls
    assert len({c.id for c in got_calls}) == len(got_calls)
    if parser == "mistral":   # Mistral's templates refuse any other id when it comes back in the history
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)
    else:
        assert all(c.id.startswith("call_") for c in got_calls)


@pytest.mark.parametrize("parser, text", [
    ("llama3_json", '{"name": "Alice", "age": 30}'),                        # plain JSON, not a call
    ("llama3_json", '{"name": "unknown_tool", "parameters": {}}'),            # not one of the tools
    ("hermes", '<tool_call>{"name": "sum"}</tool_call>'),                    # no arguments
    ("mistral", '[{"name": "Bob", "arguments": {}}]'),
])
def test_what_is_not_a_call_of_a_given_tool_stays_content(parser, text):
    assert make_parser(parser, ["sum", "get_weather"]).parse(text) == (text, [])


@pytest.mark.parametrize("parser, text, content, calls", CANNED)
def test_streaming_one_character_at_a_time_assembles_the_same(parser, text, content, calls):
    stream = ToolCallStream(make_parser(parser))
    streamed, got_calls = "", []
    for i, ch in enumerate(text):
        delta, new_calls = stream.feed(ch, i == len(text) - 1)
        streamed += delta
        got_calls += new_calls
        if calls and i < len(text) - 1:   # nothing of a call leaks out as content before the end
            assert len(streamed) <= len(content)
    assert streamed == content and _as_pairs(got_calls) == calls


def test_plain_text_streams_as_it_comes():
    stream = ToolCallStream(make_parser("hermes"))
    assert stream.feed("Hello wor", False) == ("Hello wor", [])
    assert stream.feed("ld <tool", False) == ("ld ", [])    # "<tool" may begin a call: held
    assert stream.feed("s>", False) == ("<tools>", [])
    assert stream.feed("!", True) == ("!", [])


def test_the_parser_is_chosen_from_the_chat_template():
    assert parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert parser_for_template("<|start_header_id|>ipython ... parameters ... <|python_tag|>") == "llama3_json"
    assert parser_for_template("[AVAILABLE_TOOLS] ... [TOOL_CALLS]") == "mistral"
    assert parser_for_template(None) == "hermes"


def test_a_template_without_tools_gets_the_hermes_prompt_and_history_as_text():
    tools = [FunctionTool("get_weather", "Weather now", {"type": "object"})]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}}]},
                {"role": "tool", "content": "18C", "tool_call_id": "c1"}]
    rendered, template_tools = prompt_messages(messages, tools, template_knows_tools=False)
    assert template_tools is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    assert '"name":"get_weather"' in rendered[0]["content"] and "<tool_call>" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content":
                           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    two, _ = prompt_messages(messages + [{"role": "tool", "content": "windy"}], tools, template_knows_tools=False)
    assert two[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>\n"
                                                 "<tool_response>\nwindy\n</tool_response>"} and len(two) == 4
    same, template_tools = prompt_messages(messages, tools, template_knows_tools=True)
    assert same is messages and template_tools == [tools[0].as_openai()]


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("parallel", [False, True])
def test_forced_call_grammars_compile(llama, parser, parallel):
    import llguidance
    import llguidance.hf

    from server.tokenizer import load_tokenizer
    tok = load_tokenizer(llama)
    ll = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=[tok.eos_token_id])
    tools = [FunctionTool("a", None, {"type": "object", "properties": {"x": {"type": "integer"}}}), FunctionTool("b"),
             FunctionTool("c", None, {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}},   # as Pydantic
                                      "$defs": {"Loc": {"type": "object", "properties": {"lat": {"type": "number"}}}}})]
    spec = forced_call_grammar(parser, tools, parallel)
    assert spec.kind == "grammar" and spec.field == "tool_choice"
    matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("grammar", spec.spec), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
