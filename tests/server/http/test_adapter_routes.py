"""Adapters over HTTP: served by name to the openai client, listed, loaded and unloaded while traffic runs."""
import asyncio
import shutil

import httpx
import openai
import pytest

from tests.conftest import random_prompts
from tests.server.conftest import MODEL_NAME, LiveServer, MergedReference


@pytest.fixture(scope="module")
def lora_dir(peft_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dir")
    shutil.copytree(peft_adapters["alpha"], root / "alpha")
    shutil.copytree(peft_adapters["beta"], root / "store" / "beta")   # loaded at runtime, as store/beta
    return root


@pytest.fixture(scope="module")
def lora_live(llama, lora_dir):
    with LiveServer(llama, kv_cache_tokens=8192, lora_dir=str(lora_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def expected(llama, peft_adapters):
    """Greedy tokens of peft's merged models for a few prompts: what every served request must return."""
    prompts = random_prompts(4, [5, 9, 14, 7], seed=21)
    refs = {None: MergedReference(llama, None), "alpha": MergedReference(llama, peft_adapters["alpha"]),
            "beta": MergedReference(llama, peft_adapters["beta"])}
    return prompts, {name: [ref.greedy(p, 8) for p in prompts] for name, ref in refs.items()}


def test_models_lists_adapters_with_the_base_as_parent(lora_live):
    models = openai.OpenAI(base_url=lora_live.url + "/v1", api_key="unused").models.list().data
    by_id = {m.id: m for m in models}
    assert set(by_id) == {MODEL_NAME, "alpha"}
    assert by_id["alpha"].parent == MODEL_NAME and by_id[MODEL_NAME].parent is None


def test_the_openai_client_reaches_an_adapter_by_its_name(lora_live, expected):
    client = openai.OpenAI(base_url=lora_live.url + "/v1", api_key="unused", max_retries=0)
    prompts, want = expected
    out = client.completions.create(model="alpha", prompt=prompts[0], max_tokens=8, temperature=0)
    assert out.model == "alpha"
    assert out.choices[0].text == lora_live.engine.tokenizer.decode(want["alpha"][0], skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gamma", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("body,status,fragment", [
    ({"lora_name": "x", "lora_path": "../elsewhere"}, 400, "outside --lora-dir"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "outside --lora-dir"),
    ({"lora_name": "x", "lora_path": "nothing-here"}, 400, "adapter_config.json not found"),
    ({"lora_name": "alpha", "lora_path": "store/beta"}, 400, "is taken"),
    ({"lora_name": MODEL_NAME, "lora_path": "store/beta"}, 400, "is taken"),
    ({"lora_path": "store/beta"}, 400, "lora_name must be a non-empty string"),
    ({"lora_name": "x", "lora_path": 3}, 400, "lora_path must be a non-empty string")])
def test_a_bad_load_is_a_400_and_changes_nothing(lora_live, body, status, fragment):
    r = httpx.post(lora_live.url + "/v1/load_lora_adapter", json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert set(lora_live.engine.core.adapters) == {"alpha"}


def test_unloading_an_unknown_adapter_is_a_404(lora_live):
    r = httpx.post(lora_live.url + "/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_under_traffic_never_fail_or_mix_up_requests(lora_live, expected):
    prompts, want = expected
    url = lora_live.url

    async def ask(client, model, i, max_tokens=8):
        r = await client.post(url + "/generate", json={"model": model, "prompt": prompts[i], "temperature": 0,
                                                       "max_tokens": max_tokens})
        return r.status_code, r.json()

    async def steady(client, stop: asyncio.Event, results: list):
        # Base and alpha traffic that the adapter churn beside it must not disturb.
        k = 0
        while not stop.is_set():
            model, i = [MODEL_NAME, "alpha"][k % 2], k % len(prompts)
            results.append((model, i, await ask(client, model, i)))
            k += 1

    async def churn(client):
        log = []
        for round_ in range(3):
            name = f"beta{round_}"
            r = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "store/beta"})
            assert r.status_code == 200, r.text
            # Requests in flight when the unload comes finish with the right adapter; later ones get 404.
            inflight = [asyncio.ensure_future(ask(client, name, i)) for i in range(len(prompts))]
            await asyncio.sleep(0.02)
            r = await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 200, r.text
            log += [(i, result) for i, result in enumerate(await asyncio.gather(*inflight))]
            status, body = await ask(client, name, 0)
            assert status == 404 and body["error"]["code"] == "model_not_found"
        return log

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            stop, results = asyncio.Event(), []
            workers = [asyncio.ensure_future(steady(client, stop, results)) for _ in range(4)]
            churned = await churn(client)
            stop.set()
            await asyncio.gather(*workers)
            return results, churned

    results, churned = asyncio.run(main())
    assert len(results) >= 8
    for model, i, (status, body) in results:
        assert status == 200, body
        assert body["token_ids"] == want[None if model == MODEL_NAME else model][i], (model, i)
    for i, (status, body) in churned:
        # Sent before the unload: answered in full with beta's output, or refused at once if the unload won the race.
        assert (status == 200 and body["token_ids"] == want["beta"][i]) or status == 404, body
    assert sum(status == 200 for _, (status, _) in churned) >= len(prompts)
    assert set(lora_live.engine.core.adapters) == {"alpha"}
    assert lora_live.wait_until_all_blocks_free()


def test_metrics_count_each_adapter_under_its_own_name(lora_live, expected):
    prompts, _ = expected
    before = _metric(lora_live, 'lmserve_requests_finished_total{finished_reason="length",model_name="alpha"}')
    r = httpx.post(lora_live.url + "/generate", json={"model": "alpha", "prompt": prompts[1], "max_tokens": 3,
                                                      "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    assert _metric(lora_live, 'lmserve_requests_finished_total{finished_reason="length",model_name="alpha"}') \
        == before + 1
    assert _metric(lora_live, 'lmserve_lora_adapters{state="loaded"}') == 1
    assert _metric(lora_live, 'lmserve_lora_adapters{state="resident"}') >= 1


def _metric(live, series: str) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0
