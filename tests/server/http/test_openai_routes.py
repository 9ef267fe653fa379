"""The official openai client, sync and async, against a live server: outputs, streaming, n, logprobs, errors."""
import asyncio
import json

import httpx
import openai
import pytest

from server.tokenizer import encode_chat
from tests.server.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_completion_greedy_equals_hf(live, client, hf_reference):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    ids = live.engine.tokenizer.encode(prompt)
    expected = hf_reference("llama").greedy(ids, 12, eos=False)
    assert out.choices[0].text == live.engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert out.object == "text_completion" and out.model == MODEL_NAME and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == len(ids) + 12


def test_completion_accepts_every_prompt_form(client):
    texts = client.completions.create(model=MODEL_NAME, prompt=["Hello", "World"], max_tokens=3, temperature=0)
    tokens = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    token_lists = client.completions.create(model=MODEL_NAME, prompt=[[5, 6], [7, 8, 9]], max_tokens=3, n=2,
                                            temperature=0)
    assert [c.index for c in texts.choices] == [0, 1]
    assert len(tokens.choices) == 1 and tokens.usage.prompt_tokens == 3
    assert [c.index for c in token_lists.choices] == [0, 1, 2, 3]
    assert token_lists.choices[0].text == token_lists.choices[1].text  # greedy copies agree
    assert token_lists.usage.prompt_tokens == 5


def test_chat_completion_uses_the_chat_template(live, client, hf_reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    ids = encode_chat(live.engine.tokenizer, messages)
    expected = hf_reference("llama").greedy(ids, 8, eos=False)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == live.engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ids)


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_streamed_usage_counts_a_shared_prompt_once(client):
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 6


def test_completion_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == client.completions.create(**kwargs).choices[0].text


def test_n_and_seed(client):
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Tell"}], max_tokens=8, n=2, seed=7,
                  temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 16


def test_logprobs_completions_and_chat(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=3,
                                    echo=True, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) <= 3 for t in lp.top_logprobs[1:])
    assert out.choices[0].text.startswith("Hello") and lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob for c in content)


def test_models_tokenize_detokenize(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    tok = httpx.post(live.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == live.engine.tokenizer.encode("Hello world") and tok["count"] == len(tok["tokens"])
    text = httpx.post(live.url + "/detokenize", json={"tokens": tok["tokens"][1:]}).json()["prompt"]
    assert text == "Hello world"


def test_async_client_50_concurrent_streams(live):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)

        async def one(i):
            stream = await aclient.completions.create(model=MODEL_NAME, prompt=f"Request {i}", max_tokens=8,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])
        streamed = await asyncio.gather(*(one(i) for i in range(50)))
        singles = [(await aclient.completions.create(model=MODEL_NAME, prompt=f"Request {i}", max_tokens=8,
                                                     temperature=0, extra_body={"ignore_eos": True})).choices[0].text
                   for i in (0, 17, 49)]
        await aclient.close()
        return streamed, singles
    streamed, singles = asyncio.run(main())
    assert [streamed[i] for i in (0, 17, 49)] == singles
    assert live.wait_until_all_blocks_free()


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": [1] * 600}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL_NAME, "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"model": MODEL_NAME, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL_NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": MODEL_NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL_NAME, "prompt": [[]]}, 400, "prompt"),
    ({"model": MODEL_NAME}, 400, "prompt"),
    ({"model": "", "prompt": "hi"}, 400, "model"),
    ({"model": 3, "prompt": "hi"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
])
def test_bad_completion_requests(live, body, status, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("messages,param,says", [
    ([{"role": "wizard", "content": "hi"}], "messages[0].role", "must be one of system, developer, user"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user"}], "messages[1].content", "(user) has no content"),
    ([{"role": "system", "content": None}], "messages[0].content", "(system) has no content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[1]", "has type 'image_url'"),
    ([{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0]", "has no type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0]", "text must be a string"),
])
def test_bad_chat_messages_name_the_message(live, messages, param, says):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_model_may_be_omitted_and_content_may_be_text_parts(live, client):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME
    named = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, temperature=0)
    assert r.json()["choices"][0]["text"] == named.choices[0].text
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    r = httpx.post(live.url + "/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
        "max_tokens": 3, "temperature": 0})
    plain = client.chat.completions.create(model=MODEL_NAME, max_tokens=3, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain.choices[0].message.content
    models = httpx.get(live.url + "/v1/models").json()["data"]
    assert models[0]["max_model_len"] == live.engine.max_model_len == 512


def test_prompt_too_long_states_context_and_count(live):
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [1] * 600})
    message = r.json()["error"]["message"]
    assert "maximum context length is 512" in message and "600 tokens" in message


@pytest.mark.parametrize("method,path,content,status", [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("GET", "/v1/completions", None, 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL_NAME, "messages": []}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL_NAME, "messages": [{"content": "x"}]}).encode(), 400),
    ("POST", "/v1/nothing", b"{}", 404),
    ("POST", "/detokenize", b'{"tokens": [-1]}', 400),
])
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(live, client, method, path, content, status):
    r = httpx.request(method, live.url + path, content=content)
    assert r.status_code == status and "error" in r.json()
    assert client.completions.create(model=MODEL_NAME, prompt="ok", max_tokens=1).choices


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_client_disconnect_aborts_the_request_and_frees_blocks(live):
    # 400 tokens take 400 engine steps when run to the end; an aborted request stops far earlier.
    body = {"model": MODEL_NAME, "prompt": "Keep going", "max_tokens": 400, "ignore_eos": True}
    steps = live.num_steps()
    with httpx.stream("POST", live.url + "/v1/completions", json=body | {"stream": True}) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    assert live.wait_until_all_blocks_free()
    assert live.num_steps() - steps < 300
    steps = live.num_steps()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/completions", json=body, timeout=0.1)  # non-streaming, gives up early
    assert live.wait_until_all_blocks_free()
    assert live.num_steps() - steps < 300
    steps = live.num_steps()
    generate = {"prompt": "Keep going", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/generate", json=generate, timeout=0.1)      # the minimal endpoint too
    assert live.wait_until_all_blocks_free()
    assert live.num_steps() - steps < 300
