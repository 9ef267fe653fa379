"""lmserve on Ray Serve, locally on the CPU: two engine replicas of the tiny model behind the prefix-aware router.
Requests get the tokens a single server gives, both replicas serve, requests sharing a prefix land where it is
cached, and the single server's errors, streams and disconnects come through unchanged."""
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import free_port
from bench.ray_serve import replica_names
from server.config import EngineConfig, ServerConfig
from tests.server.conftest import MODEL_NAME, LiveServer

if os.environ.get("CI"):
    import ray  # noqa: F401   (the README's test command installs the [ray] extra: in CI these tests must run)
else:
    pytest.importorskip("ray.serve")

HEADER = "x-lmserve-replica"


@pytest.fixture(scope="module")
def ray_url(llama):
    import ray
    from ray import serve

    from server.ray_serve.app import ReplicaOptions, application
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="lmray"),
             object_store_memory=100 * 2**20, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineConfig(model=llama, served_model_name=MODEL_NAME, max_wait_ms=1, kv_cache_tokens=8192)
        serve.run(application(engine, ServerConfig(), ReplicaOptions(num_replicas=2, replica_cpus=0.5, replica_gpus=0)),
                  name="lmserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(llama):
    with LiveServer(llama, kv_cache_tokens=8192) as server:
        yield server


def generate(url: str, prompt: str, **headers) -> httpx.Response:
    r = httpx.post(url + "/generate", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                            "ignore_eos": True}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of name whose labels include labels."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_shared_prefixes_land_on_the_replica_that_holds_them(ray_url, single):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    groups = [" ".join(words[g:] + words[:g]) * 4 for g in range(4)]   # 4 prefixes, each over 3 KV blocks
    tokens = httpx.post(single.url + "/tokenize", json={"prompt": groups[0]}).json()["count"]
    assert tokens >= 3 * 16 + 1
    prompts = [[f"{prefix} question {i} of group {g}?" for i in range(10)] for g, prefix in enumerate(groups)]
    expected = {p: generate(single.url, p).json()["token_ids"] for group in prompts for p in group}

    first = {g: generate(ray_url, group[0]) for g, group in enumerate(prompts)}   # each prefix cached somewhere
    with ThreadPoolExecutor(4) as pool:
        rest = {g: list(pool.map(lambda p: generate(ray_url, p), group[1:])) for g, group in enumerate(prompts)}

    served: dict[str, int] = {}
    for g, group in enumerate(prompts):
        home = first[g].headers[HEADER]
        responses = [first[g], *rest[g]]
        for prompt, r in zip(group, responses):
            assert r.json()["token_ids"] == expected[prompt]            # the tokens a single server gives
            served[r.headers[HEADER]] = served.get(r.headers[HEADER], 0) + 1
        at_home = [r for r in rest[g] if r.headers[HEADER] == home]
        assert len(at_home) >= 0.8 * len(rest[g]), (g, home, [r.headers[HEADER] for r in rest[g]])
        assert all(r.json()["usage"]["cached_tokens"] >= 3 * 16 for r in at_home)   # its prefix, from the cache
    assert len(served) == 2, served                                     # both replicas serve

    for name in served:   # each replica's own counters, read from it by name
        r = httpx.get(ray_url + "/metrics", headers={HEADER: name})
        assert r.status_code == 200 and r.headers[HEADER] == name
        assert 0 < metric(r.text, "lmserve_prefix_cache_hit_ratio") <= 1
        assert metric(r.text, "lmserve_requests_finished_total") >= served[name]


def test_streams_errors_and_routes_come_through_as_a_single_server_sends_them(ray_url, single):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", ray_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[HEADER]
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    bad = httpx.post(ray_url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.post(ray_url + "/v1/completions", content=b"\xff{").status_code == 400
    assert httpx.get(ray_url + "/nowhere").status_code == 404
    assert httpx.get(ray_url + "/health").status_code == 200
    models = httpx.get(ray_url + "/v1/models").json()["data"]
    assert models[0]["id"] == MODEL_NAME


def test_a_client_that_leaves_mid_stream_aborts_its_request_on_the_replica(ray_url):
    body = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", ray_url + "/v1/completions", json=body, timeout=60) as r:
        name = r.headers[HEADER]
        before = httpx.get(ray_url + "/metrics", headers={HEADER: name}).text
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = httpx.get(ray_url + "/metrics", headers={HEADER: name}).text
        if (metric(after, "lmserve_requests_finished_total", finished_reason="abort")
                > metric(before, "lmserve_requests_finished_total", finished_reason="abort")):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the replica did not abort the request its client left")
    assert metric(after, "lmserve_num_requests_running") == 0


def test_a_client_that_leaves_before_the_first_byte_aborts_its_request_on_the_replica(ray_url):
    names = replica_names(ray_url, 2, timeout=30)
    assert len(names) == 2, names

    def aborted() -> float:
        return sum(metric(httpx.get(ray_url + "/metrics", headers={HEADER: n}).text, "lmserve_requests_finished_total",
                          finished_reason="abort") for n in names)
    before = aborted()
    body = {"model": MODEL_NAME, "prompt": "Go on and on", "max_tokens": 490, "ignore_eos": True}   # not streamed
    with pytest.raises(httpx.TimeoutException):
        httpx.post(ray_url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 30
    while aborted() == before:
        assert time.monotonic() < deadline, "the replica did not abort the request its client left"
        time.sleep(0.2)
