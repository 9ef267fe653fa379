"""/metrics: values move exactly as the traffic says (scraped from a live server, in Prometheus text format)."""
import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME


def scrape(live) -> dict:
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(live, prompt, max_tokens, **extra):
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_counters_and_histograms_move_with_traffic(live):
    m = {"model_name": MODEL_NAME}
    before = scrape(live)
    usages = [complete(live, [10 + i, 11, 12, 13], 5)["usage"] for i in range(3)]
    after = scrape(live)
    assert value(after, "lmserve_generation_tokens_total", **m) - value(before, "lmserve_generation_tokens_total", **m) == 15
    assert value(after, "lmserve_prompt_tokens_total", **m) - value(before, "lmserve_prompt_tokens_total", **m) == 12
    for name in ("lmserve_time_to_first_token_seconds_count", "lmserve_e2e_request_latency_seconds_count",
                 "lmserve_request_queue_time_seconds_count"):
        assert value(after, name, **m) - value(before, name, **m) == 3, name
    assert value(after, "lmserve_inter_token_latency_seconds_count", **m) - \
        value(before, "lmserve_inter_token_latency_seconds_count", **m) == 12
    finished = "lmserve_requests_finished_total"
    assert value(after, finished, finished_reason="length", **m) - value(before, finished, finished_reason="length", **m) == 3
    assert value(after, "lmserve_batch_size_count") > value(before, "lmserve_batch_size_count")
    assert all(u["completion_tokens"] == 5 for u in usages)


def test_gauges_at_idle_and_prefix_hit_ratio(live):
    prefix = list(range(20, 70))                       # 3 full blocks and 2 tokens
    complete(live, prefix + [1], 1)
    complete(live, prefix + [2], 1)
    samples = scrape(live)
    assert value(samples, "lmserve_num_requests_running") == 0
    assert value(samples, "lmserve_num_requests_waiting") == 0
    assert value(samples, "lmserve_kv_cache_usage_ratio") == 0
    assert 0 < value(samples, "lmserve_prefix_cache_hit_ratio") <= 1


def test_aborted_requests_are_counted_by_reason(live):
    m = {"model_name": MODEL_NAME, "finished_reason": "abort"}
    before = value(scrape(live), "lmserve_requests_finished_total", **m)
    body = {"model": MODEL_NAME, "prompt": "Go", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    assert live.wait_until_all_blocks_free()
    assert value(scrape(live), "lmserve_requests_finished_total", **m) - before == 1


def test_http_responses_are_counted_by_route_and_code(live):
    before = scrape(live)
    complete(live, [10, 11, 12], 2)
    assert httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1}
                      ).status_code == 400
    assert httpx.get(live.url + "/no/such/route?" + "x" * 100).status_code == 404
    after = scrape(live)

    def moved(route, code):
        def total(samples):
            return sum(v for (name, labels), v in samples.items() if name == "lmserve_http_responses_total"
                       and {("route", route), ("code", code)} <= set(labels))
        return total(after) - total(before)
    assert moved("/v1/completions", "200") == 1 and moved("/v1/completions", "400") == 1
    assert moved("other", "404") == 1   # a path that is no route is not a label value of its own
    assert moved("/metrics", "200") == 1  # the first scrape, counted as it answered


def test_adapter_load_failures_are_counted(live):
    name = "lmserve_lora_adapter_load_failures_total"
    before = value(scrape(live), name)
    r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": "missing"})
    assert r.status_code == 400
    assert value(scrape(live), name) - before == 1


def test_what_routers_read_matches_the_engine_under_load_with_adapters(llama, peft_adapters):
    """The Gateway API Inference Extension's endpoint picker reads queued requests, KV-cache use (0-1) and the
    LoRA adapters of running and waiting requests: read from /metrics while requests for two adapters and the
    base model run two at a time, each scrape against the engine's own state around it."""
    import threading
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from tests.server.conftest import LiveServer
    loras = [("alpha", peft_adapters["alpha"]), ("beta", peft_adapters["beta"])]
    with LiveServer(llama, kv_cache_tokens=4096, max_batch_size=2, loras=loras, max_loras=2) as server:
        core = server.engine.core

        def engine_view():
            waiting = [s for s in core._seqs.values() if s.status.value == "waiting"]
            return (len(waiting), sorted({s.lora.name for s in core.scheduler.running if s.lora}),
                    sorted({s.lora.name for s in waiting if s.lora}), core.block_manager.usage)

        def send(model):
            httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": "The quick brown fox", "max_tokens": 150, "ignore_eos": True})
        clients = [threading.Thread(target=send, args=(m,)) for m in ["alpha", "beta", MODEL_NAME, "alpha", "beta"] * 2]
        for c in clients:
            c.start()
        checked, deadline = 0, time.monotonic() + 60
        while checked < 3 and time.monotonic() < deadline:
            before = engine_view()
            text = httpx.get(server.url + "/metrics", timeout=30).text
            if engine_view() != before or not before[0]:
                continue   # the engine moved during the scrape, or nothing waits yet: read again
            families = {f.name: f for f in text_string_to_metric_families(text)}
            (info,) = families["lmserve_lora_requests_info"].samples
            assert info.labels == {"running_lora_adapters": ",".join(before[1]),
                                   "waiting_lora_adapters": ",".join(before[2]), "max_lora": "2"}
            assert abs(info.value - time.time()) < 30
            assert families["lmserve_num_requests_waiting"].samples[0].value == before[0] > 0
            assert families["lmserve_kv_cache_usage_ratio"].samples[0].value == before[3]
            assert 0 < before[3] <= 1
            checked += 1
        for c in clients:
            c.join()
        assert checked == 3, "no stable scrape while requests waited"
