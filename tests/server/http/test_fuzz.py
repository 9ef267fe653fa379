"""Property-based fuzzing of every HTTP endpoint of a real server process: generated JSON bodies with the
fields each route reads (and others) holding wrong types, huge numbers, NaN, unicode; raw and truncated bodies.
Bad input must never be a 500 or bring the server down."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.processes import start_lmserve

POST = ["/v1/completions", "/v1/chat/completions", "/generate", "/tokenize", "/detokenize", "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter"]
GET = ["/health", "/metrics", "/v1/models", "/v1/nothing"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "logit_bias", "min_tokens",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids", "tokens",
          "lora_name", "lora_path", "add_special_tokens", "prompt_logprobs", "min_p", "role", "content", "user"]

scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.integers(-3, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6), max_leaves=20)
small_prompt = st.lists(st.integers(0, 500), min_size=1, max_size=8) | st.text(min_size=1, max_size=30)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                           "content": st.text(max_size=30) | values}), max_size=3)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8) | st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "nope", ""]), "prompt": small_prompt | values,
     "max_tokens": st.integers(-2, 6) | values}, optional={"messages": messages, "stream": st.booleans(),
                                                           "n": st.integers(-1, 3), "logprobs": st.integers(-1, 25),
                                                           "stop": values, "logit_bias": values,
                                                           "temperature": scalars})


VALID = {"model": "tiny", "prompt": "Hello", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
         "temperature": 0}
near_valid = st.builds(lambda field, value, stream: VALID | {field: value, "stream": stream},
                       st.sampled_from(FIELDS), values, st.booleans())


CONTROL = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>", "system", "\n", "{{", "{%", "}}"]
control_text = st.lists(st.sampled_from(CONTROL) | st.text(max_size=6), max_size=8).map("".join)
content_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "", 3]),
                                                "text": control_text | values}), max_size=4)
chat_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard"]),
     "content": control_text | content_parts | values},
    optional={"name": control_text | values}), min_size=1, max_size=4)
adapter_configs = values | st.fixed_dictionaries(
    {"r": values | st.integers(-2, 80) | st.floats(), "lora_alpha": values | st.floats()},
    optional={"peft_type": values, "use_rslora": values, "use_dora": values, "bias": values,
              "target_modules": values, "modules_to_save": values, "rank_pattern": values})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-loras")


@pytest.fixture(scope="module")
def server(llama, lora_dir):
    process = start_lmserve("--model", llama, "--served-model-name", "tiny", "--max-model-len", "64",
                            "--kv-cache-tokens", "2048", "--lora-dir", str(lora_dir))
    with httpx.Client(base_url=process.url, timeout=60) as client:
        yield client
    process.stop()


def _check(r: httpx.Response):
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "message" in r.json()["error"]


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(path=st.sampled_from(POST), body=bodies)
def test_json_bodies_never_500(server, path, body):
    _check(server.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"]), body=near_valid)
def test_valid_bodies_with_one_field_gone_wrong_never_500(server, path, body):
    if path != "/v1/chat/completions":
        body.pop("messages")
    _check(server.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(POST), body=values)
def test_any_json_value_never_500(server, path, body):
    _check(server.post(path, content=json.dumps(body)))


@FUZZ
@given(path=st.sampled_from(POST), body=bodies, cut=st.floats(0, 1), junk=st.binary(max_size=40))
def test_truncated_and_raw_bodies_never_500(server, path, body, cut, junk):
    text = json.dumps(body).encode()
    _check(server.post(path, content=text[:int(len(text) * cut)]))
    _check(server.post(path, content=junk))


@pytest.mark.parametrize("path", POST)
def test_bodies_nested_deeper_than_the_json_parser_goes_are_400(server, path):
    for nested in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        r = server.post(path, content=nested)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]["message"]


@FUZZ
@given(messages=chat_messages, stream=st.booleans())
def test_chat_content_never_500_and_never_forges_control_tokens(server, messages, stream):
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0, "stream": stream}
    _check(server.post("/v1/chat/completions", content=json.dumps(body)))
    r = server.post("/tokenize", content=json.dumps({"messages": messages}))
    _check(r)
    if r.status_code == 200:   # the control tokens are the template's: as many as for the same turns saying "x"
        plain = [m | {"content": "x"} | ({"name": "x"} if "name" in m else {}) for m in messages]
        honest = server.post("/tokenize", content=json.dumps({"messages": plain}))
        if honest.status_code == 200:
            im = server.post("/tokenize", json={"prompt": "<|im_start|><|im_end|>", "parse_special_tokens": True,
                                               "add_special_tokens": False}).json()["tokens"]
            assert sum(t in im for t in r.json()["tokens"]) == sum(t in im for t in honest.json()["tokens"])


@FUZZ
@given(config=adapter_configs)
def test_adapter_configs_never_500(server, lora_dir, peft_adapters, config):
    import shutil
    import uuid
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    shutil.copytree(peft_adapters["alpha"], lora_dir / name)
    (lora_dir / name / "adapter_config.json").write_text(json.dumps(config))
    r = server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
    _check(r)
    if r.status_code == 200:
        assert server.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(GET), query=st.text(max_size=20))
def test_get_routes_never_500(server, path, query):
    _check(server.get(path, params={"q": query}))


def test_the_server_still_serves_after_the_fuzzing(server):
    assert server.get("/health").status_code == 200
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
