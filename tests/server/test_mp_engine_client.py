"""MultiprocessEngineClient against a real engine core process: the same tokens as transformers and as the
in-process client (batched, preempted, prefix-cached, with LoRA), stop strings ended from the API side, aborts
that free blocks in the core, a core that dies, and an engine socket that refuses what it cannot decode."""
import asyncio
import os
import pickle
import signal
import time

import msgspec
import pytest
import zmq

from batching.messages import encoder
from server.config import EngineConfig
from server.errors import EngineDeadError, ModelNotFoundError
from server.mp_engine_client import MultiprocessEngineClient, start_engine_core
from server.sampling import InvalidRequestError, SamplingParams
from tests.conftest import collect, random_prompts, run
from tests.server.conftest import MergedReference, metric_sums

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


class CoreProcess:
    """An engine core process for one config; each test connects its own client on its own event loop."""

    def __init__(self, **config):
        self.process, self.address = start_engine_core(EngineConfig(max_wait_ms=1, **config), "warning")

    async def client(self) -> MultiprocessEngineClient:
        return await MultiprocessEngineClient.connect(self.address, timeout=120)   # the fixture stops the core

    def stop(self):
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGUSR1)   # how the API process that starts a core stops it
        self.process.join(10)


@pytest.fixture(scope="module")
def llama_core(llama, peft_adapters):
    core = CoreProcess(model=llama, kv_cache_tokens=2048, loras=list(peft_adapters.items()))
    yield core
    core.stop()


def metric(text: bytes, name: str) -> float:
    """The sum of a metric's samples in Prometheus text."""
    return metric_sums(text.decode()).get(name, 0.0)


async def until_idle(client: MultiprocessEngineClient, timeout: float = 10) -> bytes:
    """The core's metrics once no request runs or waits there and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        text = await client.metrics()
        idle = not any(metric(text, m) for m in ("lmserve_num_requests_running", "lmserve_num_requests_waiting"))
        if idle and metric(text, "lmserve_kv_cache_usage_ratio") == 0 or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_a_batch_through_the_core_process_matches_hf(checkpoints, hf_reference, arch):
    core = CoreProcess(model=checkpoints[arch], kv_cache_tokens=2048)
    prompts = random_prompts(5, [3, 9, 17, 33, 40], seed=1)

    async def main():
        client = await core.client()
        results = await asyncio.gather(*(collect(client, p, GREEDY) for p in prompts))
        await client.shutdown()
        return results
    try:
        results = run(main())
    finally:
        core.stop()
    ref = hf_reference(arch)
    for prompt, (tokens, text, last) in zip(prompts, results):
        assert tokens == ref.greedy(prompt, GREEDY.max_tokens, eos=False)
        assert last.finish_reason == "length" and last.num_output_tokens == GREEDY.max_tokens


def test_preemption_and_the_prefix_cache_in_the_core_process_keep_outputs_identical(llama, hf_reference):
    core = CoreProcess(model=llama, kv_cache_tokens=96)   # 6 blocks for 4 sequences that grow to ~50 tokens
    prompts = random_prompts(4, [18, 22, 25], seed=3)
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    prefix = random_prompts(1, [40], seed=6)[0]

    async def main():
        client = await core.client()
        preempted = await asyncio.gather(*(collect(client, p, params) for p in prompts))
        first = await collect(client, prefix + [7, 8], GREEDY)
        second = await collect(client, prefix + [9], GREEDY)
        text = await until_idle(client)
        await client.shutdown()
        return preempted, first, second, text
    try:
        preempted, first, second, text = run(main())
    finally:
        core.stop()
    ref = hf_reference("llama")
    assert metric(text, "lmserve_num_preemptions_total") > 0
    for prompt, (tokens, _, _) in zip(prompts, preempted):
        assert tokens == ref.greedy(prompt, params.max_tokens, eos=False)
    assert second[2].num_cached_tokens >= 32 and first[2].num_cached_tokens == 0
    assert second[0] == ref.greedy(prefix + [9], GREEDY.max_tokens, eos=False)
    assert metric(text, "lmserve_kv_cache_usage_ratio") == 0


def test_a_mixed_lora_batch_through_the_core_process_equals_peft(llama_core, llama, peft_adapters):
    prompts = random_prompts(3, [6, 11, 15], seed=8)
    names = [None, "alpha", "beta"]

    async def main():
        client = await llama_core.client()
        listed = [a.name for a in await client.adapters()]
        outs = await asyncio.gather(*(_tokens(client, p, name) for p in prompts for name in names))
        with pytest.raises(ModelNotFoundError):
            await client.check_model("gamma")
        await client.shutdown()
        return listed, outs
    listed, outs = run(main())
    assert listed == ["alpha", "beta"]
    refs = {name: MergedReference(llama, peft_adapters[name] if name else None) for name in names}
    expected = [refs[name].greedy(p, GREEDY.max_tokens) for p in prompts for name in names]
    assert outs == expected


async def _tokens(client, prompt, adapter):
    return [t async for out in client.generate(prompt, GREEDY, adapter=adapter) for t in out.token_ids]


def test_stop_strings_are_found_in_the_api_process_and_end_the_request_in_the_core(llama_core):
    async def main():
        client = await llama_core.client()
        full = (await collect(client, "Hello world", GREEDY))[1]
        stop = full[len(full) // 2: len(full) // 2 + 2]
        tokens, text, last = await collect(client, "Hello world", SamplingParams(temperature=0, max_tokens=20,
                                                                                 ignore_eos=True, stop=[stop]))
        idle = await until_idle(client)
        await client.shutdown()
        return full, stop, text, last, idle
    full, stop, text, last, idle = run(main())
    assert text == full[:full.index(stop)] and last.finish_reason == "stop" and last.stop_reason == stop
    assert metric(idle, "lmserve_kv_cache_usage_ratio") == 0
    assert 'finished_reason="stop"' in idle.decode()


def test_leaving_a_stream_aborts_the_request_in_the_core_and_frees_its_blocks(llama_core):
    async def main():
        client = await llama_core.client()
        stream = client.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(stream)
        busy = metric(await client.metrics(), "lmserve_kv_cache_usage_ratio")
        await stream.aclose()
        idle = await until_idle(client)
        await client.shutdown()
        return busy, idle
    busy, idle = run(main())
    assert busy > 0 and metric(idle, "lmserve_kv_cache_usage_ratio") == 0
    assert 'finished_reason="abort"' in idle.decode()


def test_refusals_reach_the_caller_as_the_same_errors(llama_core):
    async def main():
        client = await llama_core.client()
        with pytest.raises(InvalidRequestError, match="max_tokens must be between"):
            await anext(client.generate([5, 6], SamplingParams(max_tokens=10**6)))
        with pytest.raises(ModelNotFoundError):
            await anext(client.generate([5, 6], GREEDY, adapter="nope"))
        stream = client.generate([5, 6], GREEDY, request_id="same")
        await anext(stream)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await anext(client.generate([5, 6], GREEDY, request_id="same"))
        await stream.aclose()
        await client.shutdown()
    run(main())


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lmserve-pwned",))


def test_the_engine_socket_runs_no_code_and_refuses_what_does_not_decode(llama_core, tmp_path):
    marker = "/tmp/lmserve-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(llama_core.address)
    sock.send(pickle.dumps(_Payload()))                      # a pickle that would run a command if unpickled
    sock.send(b"\x93\xa3add\x00\xc0")                        # msgpack, not a message
    sock.send(encoder.encode({"type": "add", "request_id": "crafted", "prompt_token_ids": [5],
                              "params": {"temperature": -5}}))   # an AddRequest whose params do not validate
    sock.send(encoder.encode({"type": "call", "call_id": 1, "method": "__init__", "args": []}))
    sock.send(encoder.encode({"type": "call", "call_id": 2, "method": "abort_all", "args": ["everyone's"]}))
    sock.send_multipart([b"two", b"frames"])
    nested = encoder.encode({"type": "call", "call_id": 3, "method": "metrics", "args": 0})[:-1] + b"\x91" * 5000 + b"\xc0"
    sock.send(nested)                                        # arguments nested 5000 lists deep
    replies = [sock.recv() for _ in range(3) if sock.poll(10_000)]
    sock.close(linger=0)
    ctx.term()
    decoded = [msgspec.msgpack.decode(r) for r in replies]
    assert not os.path.exists(marker)
    refused = [d for d in decoded if d.get("type") == "step"]
    assert refused and refused[0]["outputs"][0][0] == "crafted" and "temperature" in refused[0]["outputs"][0][-1][1]
    calls = [d for d in decoded if d.get("type") == "reply"]
    assert [c["call_id"] for c in calls] == [1, 2] and all("no engine call" in c["error"][1] for c in calls)

    async def still_serving():
        client = await llama_core.client()
        tokens = (await collect(client, [5, 6, 7], GREEDY))[0]
        await client.shutdown()
        return tokens
    assert len(run(still_serving())) == GREEDY.max_tokens


def test_a_killed_core_fails_requests_at_once_and_turns_health_false(llama):
    core = CoreProcess(model=llama, kv_cache_tokens=1024)

    async def main():
        client = await core.client()
        deaths = []
        client.on_loop_death = deaths.append
        stream = client.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(stream)
        os.kill(core.process.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="engine core process ended"):
            async for _ in stream:
                pass
        took = time.monotonic() - started
        with pytest.raises(EngineDeadError):
            await anext(client.generate([5, 6], GREEDY))
        healthy = client.health()
        await client.shutdown()
        return took, deaths, healthy
    try:
        took, deaths, healthy = run(main())
    finally:
        core.stop()
    assert took < 5 and len(deaths) == 1 and not healthy
