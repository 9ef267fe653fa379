"""--max-queued-requests and --request-timeout: refused fast, ended cleanly, over the engine, HTTP and gRPC."""
import asyncio
import json
import time

import grpc
import httpx
import pytest

from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.errors import RequestTimeoutError, ServerBusyError
from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from server.sampling import SamplingParams
from tests.server.conftest import MODEL_NAME, LiveServer

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def test_engine_refuses_past_the_queue_bound_and_serves_the_admitted(llama):
    async def main():
        engine = in_process_engine(EngineConfig(model=llama, max_batch_size=1, max_queued_requests=2, kv_cache_tokens=4096,
                                          max_wait_ms=0))
        running = engine.generate([5, 6, 7], LONG)
        await anext(running)                                   # the one sequence that fits is running
        queued = [engine.generate([5, 6, 7 + i], SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(2)]
        waiting = [asyncio.ensure_future(anext(q)) for q in queued]
        while engine.core.num_queued < 2:
            await asyncio.sleep(0.001)
        start = time.monotonic()
        with pytest.raises(ServerBusyError, match="max-queued-requests 2"):
            await anext(engine.generate([5, 6, 8], LONG))
        refused_in = time.monotonic() - start
        await running.aclose()                                 # abort the long one: the queued two run
        for w, q in zip(waiting, queued):
            await w
            assert len([t async for out in q for t in out.token_ids]) == 2   # 1 in the first delta + 2 more = 3
        assert engine.core.metrics.rejected.labels("queue_full")._value.get() == 1
        await engine.shutdown()
        return refused_in
    assert asyncio.run(main()) < 0.05


def test_engine_ends_a_request_past_its_timeout_and_frees_its_blocks(llama):
    async def main():
        engine = in_process_engine(EngineConfig(model=llama, request_timeout=0.1, kv_cache_tokens=8192))
        tokens = 0
        with pytest.raises(RequestTimeoutError, match=r"timed out after 0.1 s .* tokens generated"):
            async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True)):
                tokens += len(out.token_ids)
        quick = [t async for out in engine.generate([5, 6], SamplingParams(max_tokens=4)) for t in out.token_ids]
        bm = engine.core.block_manager
        assert 0 < tokens < 500 and len(quick) == 4 and bm.num_free_blocks == bm.num_blocks
        await engine.shutdown()
    asyncio.run(main())


@pytest.fixture(scope="module")
def busy(llama):
    with LiveServer(llama, max_batch_size=1, max_queued_requests=1, kv_cache_tokens=8192) as server:
        yield server


def test_http_and_grpc_answer_429_and_resource_exhausted_while_admitted_requests_complete(busy):
    async def main():
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}
            running = asyncio.ensure_future(client.post("/v1/completions", json=body))
            while not busy.engine.core.scheduler.running:
                await asyncio.sleep(0.002)
            queued = asyncio.ensure_future(client.post("/v1/completions", json=body | {"max_tokens": 4}))
            while busy.engine.core.num_queued < 1:
                await asyncio.sleep(0.002)
            start = time.monotonic()
            refused = await client.post("/v1/completions", json=body)
            refused_in = time.monotonic() - start
            async with grpc.aio.insecure_channel(busy.grpc_target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GenerateUnary(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(max_tokens=2)))
            return refused, refused_in, e.value, await running, await queued
    refused, refused_in, rpc_error, running, queued = asyncio.run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1" and refused_in < 0.5
    assert refused.json()["error"]["code"] == "queue_full" and "max-queued-requests 1" in refused.json()["error"]["message"]
    assert rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.status_code == queued.status_code == 200
    assert queued.json()["usage"]["completion_tokens"] == 4
    assert busy.wait_until_all_blocks_free()


@pytest.fixture(scope="module")
def strict(llama):
    with LiveServer(llama, request_timeout=0.1, kv_cache_tokens=8192) as server:
        yield server


def test_http_timeout_is_a_408_before_streaming_and_an_error_event_after(strict):
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True}
    r = httpx.post(strict.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream("POST", strict.url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout" and "text" in events[0]
    assert httpx.post(strict.url + "/v1/completions", json=body | {"max_tokens": 3}).status_code == 200
    assert strict.wait_until_all_blocks_free()


def test_grpc_timeout_is_deadline_exceeded(strict):
    with grpc.insecure_channel(strict.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                     sampling=pb.SamplingParameters(max_tokens=500, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--request-timeout" in e.value.details()
    assert strict.wait_until_all_blocks_free()


@pytest.mark.parametrize("extra,param,fragment", [
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stop": ["y" * 257]}, "stop", "at most 256 characters"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"n": 17}, "n", "n"),
    ({"logprobs": 21}, "logprobs", "logprobs"),
])
def test_request_limits_are_400s_naming_the_field(live, extra, param, fragment):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2} | extra
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and fragment in r.json()["error"]["message"]


def test_a_body_past_the_size_limit_is_refused_unread(live):
    from server.http.protocol import MAX_BODY_BYTES
    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = httpx.post(live.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(live.url + "/v1/completions", content=iter([big[:2**20]] * 5))   # no Content-Length
    assert chunked.status_code == 400 and chunked.json()["error"]["code"] == "request_too_large"
    assert httpx.get(live.url + "/health").status_code == 200


def test_log_requests_logs_prompt_and_output_with_personal_data_masked(llama, caplog):
    async def main():
        engine = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=1024, log_requests=True))
        async for _ in engine.generate("mail bob@example.com or call +44 20 7946 0958", SamplingParams(max_tokens=3)):
            pass
        await engine.shutdown()
    with caplog.at_level("INFO", logger="lmserve.requests"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if r.name == "lmserve.requests"]
    assert "[email]" in record.getMessage() and "[phone]" in record.getMessage()
    assert "bob@" not in record.getMessage() and "7946" not in record.getMessage()
