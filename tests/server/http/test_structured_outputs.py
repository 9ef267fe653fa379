"""response_format, structured_outputs and guided_* through the official openai client, and the gRPC oneof,
against a live server with each engine client; bad specs are 400 / INVALID_ARGUMENT naming the field."""
import json
import re

import grpc
import httpx
import jsonschema
import openai
import pytest

from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from tests.server.conftest import MODEL_NAME

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "population": {"type": "integer", "minimum": 0, "maximum": 10**7},
                         "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 3},
                         "capital": {"type": "boolean"}}}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_format_chat(client, temperature):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=temperature, seed=7, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_schema_streamed_equals_unstreamed(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_starts_an_object_and_parses_when_complete(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"})
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
    ({"guided_regex": r"[a-z]{2,5}-[0-9]{3}"}, lambda t: re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", t)),
    ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}}, lambda t: isinstance(json.loads(t)["ok"], bool)),
    ({"guided_grammar": 'start: "(" n ("*" n)* ")"\nn: /[1-9]/'}, lambda t: re.fullmatch(r"\([1-9](\*[1-9])*\)", t)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ({"structured_outputs": {"regex": r"#[0-9a-f]{6}"}}, lambda t: re.fullmatch(r"#[0-9a-f]{6}", t)),
    ({"structured_outputs": {"json": json.dumps({"enum": [1, 2, 3]})}}, lambda t: json.loads(t) in (1, 2, 3)),
    ({"structured_outputs": {"grammar": 'start: "a"+ "b"'}}, lambda t: re.fullmatch("a+b", t)),
    ({"structured_outputs": {"json_object": True}}, lambda t: t.startswith("{")),
])
def test_vllm_fields_on_completions(client, extra, check):
    out = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=60, temperature=0.8, seed=3,
                                    extra_body=extra)
    assert check(out.choices[0].text), out.choices[0].text


@pytest.mark.parametrize("body, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "must be a JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "text, json_object or json_schema"),
    ({"response_format": "json"}, "response_format.type", "text, json_object or json_schema"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_regex": 5}, "guided_regex", "must be a string"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty list"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "unknown name"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "both constrain the output"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "both constrain"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs.yaml", "not supported"),
    ({"structured_outputs": {"json_object": 1}}, "structured_outputs.json_object", "must be true"),
    ({"structured_outputs": "regex"}, "structured_outputs", "must be an object"),
    ({"guided_regex": "a" * 300_000}, "guided_regex", "at most"),
    ({"guided_json": "{\"properties\": {\"a\": " * 100 + "{}" + "}}" * 100}, "guided_json", "nested more than 64"),
    ({"guided_json": {"$ref": "#"}}, "guided_json", "allows no output"),
    ({"guided_grammar": "root ::= " + " | ".join(["\"x\""] * 10_000)}, "guided_grammar", "GBNF grammar may have at most"),
    ({"guided_grammar": "\n" * 200_000 + "x"}, "guided_grammar", "Expected token"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", "Rule 'foo' not found"),
    ({"guided_regex": "(a{1000}){1000}"}, "guided_regex", "the grammar failed at output token"),   # a lexer blow-up
    ({"guided_grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}, "guided_grammar", "does not parse"),
])
def test_bad_specs_are_400s_naming_the_field(live, client, body, param, says):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    ok = client.completions.create(model=MODEL_NAME, prompt="still", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_grpc_structured_output_oneof(live):
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(live.grpc_target))
    sampling = pb.SamplingParameters(max_tokens=120, temperature=0)
    result = stub.GenerateUnary(pb.GenerateRequest(model=MODEL_NAME, text="A city:", sampling=sampling,
                                                   json_schema=json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert result.final.finish_reason == pb.FINISH_REASON_STOP
    chunks = list(stub.Generate(pb.GenerateRequest(model=MODEL_NAME, text="Pick:", sampling=sampling,
                                                   choice=pb.Choices(choices=["left", "right"]))))
    assert "".join(c.chunk.text for c in chunks if c.HasField("chunk")) in ("left", "right")
    regex = stub.GenerateUnary(pb.GenerateRequest(model=MODEL_NAME, text="Id:", sampling=sampling, regex="[A-Z]{3}[0-9]"))
    assert re.fullmatch("[A-Z]{3}[0-9]", regex.text)
    obj = stub.GenerateUnary(pb.GenerateRequest(model=MODEL_NAME, text="{", sampling=sampling, json_object=True))
    assert obj.text.startswith("{")
    for request, says in [(pb.GenerateRequest(model=MODEL_NAME, text="x", regex="a(b"), "unclosed group"),
                          (pb.GenerateRequest(model=MODEL_NAME, text="x", json_object=False), "must be true"),
                          (pb.GenerateRequest(model=MODEL_NAME, text="x", choice=pb.Choices()), "non-empty strings"),
                          (pb.GenerateRequest(model=MODEL_NAME, text="x", grammar="start: ("), "grammar")]:
        with pytest.raises(grpc.RpcError) as e:
            stub.GenerateUnary(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details(), e.value.details()


def test_response_format_text_leaves_room_for_another_constraint(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                         response_format={"type": "text"}, extra_body={"guided_choice": ["ok", "no"]})
    assert out.choices[0].message.content in ("ok", "no")


def test_a_gbnf_grammar_is_followed(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=30, temperature=1.0, seed=4,
                                    extra_body={"guided_grammar": 'root ::= "<" [a-c]+ ">"'})
    assert re.fullmatch("<[a-c]+>", out.choices[0].text)
