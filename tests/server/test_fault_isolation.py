"""A fault in one request (NaN logits, a sampling error, a detokenizer error) fails it alone; the batch goes on."""
import asyncio

import httpx
import pytest

import server.model_runner as model_runner
from server.config import EngineConfig
from server.engine_client import InProcessEngineClient, in_process_engine
from server.errors import EngineDeadError, RequestFailedError
from server.sampling import SamplingParams
from tests.server.conftest import MODEL_NAME, LiveServer

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


async def _tokens(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


def run_batch(llama, fault) -> tuple[list, InProcessEngineClient]:
    """The three prompts at once; fault(engine, request_ids) breaks the first one after its first token."""
    async def main():
        engine = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=4096, enable_prefix_caching=False))
        streams = [engine.generate(p, PARAMS, f"r{i}") for i, p in enumerate(PROMPTS)]
        firsts = [await anext(s) for s in streams]
        if fault is not None:
            fault(engine, "r0")
        rest = await asyncio.gather(*(_tokens(s) for s in streams), return_exceptions=True)
        results = [r if isinstance(r, BaseException) else f.token_ids + r for f, r in zip(firsts, rest)]
        await engine.shutdown()
        return results, engine
    return asyncio.run(main())


@pytest.fixture(scope="module")
def clean(llama):
    results, _ = run_batch(llama, None)
    assert all(len(r) == 24 for r in results)
    return results


def corrupt_kv_cache(engine, request_id):
    """NaN in every cache block of one sequence, as a corrupted cache would hold."""
    blocks = engine.core._seqs[request_id].block_table
    for cache in engine.core.runner.kv_caches:
        cache[:, blocks] = float("nan")


def break_sampling(engine, request_id):
    seq = engine.core._seqs[request_id]
    real = model_runner.sample

    def sample(logits, rows, grammar_bitmask=None):
        if any(row.token_ids is seq.token_ids for row in rows):
            raise ValueError("a broken sampler row")
        return real(logits, rows, grammar_bitmask)
    model_runner.sample = sample


def break_detokenizer(engine, request_id):
    def step(_):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    engine._requests[request_id].detokenizer.step = step


@pytest.mark.parametrize("fault,message", [(corrupt_kv_cache, "NaN or infinite"),
                                           (break_sampling, "sampling failed: ValueError"),
                                           (break_detokenizer, "detokenizing token")])
def test_one_broken_request_fails_alone(llama, clean, fault, message, monkeypatch):
    monkeypatch.setattr(model_runner, "sample", model_runner.sample)   # undone after the test
    results, engine = run_batch(llama, fault)
    assert isinstance(results[0], RequestFailedError) and "request r0 failed" in str(results[0])
    assert message in str(results[0])
    assert results[1:] == clean[1:]                       # the others, token for token as without the fault
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine._requests


def test_over_http_the_broken_request_is_a_500_naming_it(llama):
    with LiveServer(llama, kv_cache_tokens=4096) as server:
        real = server.engine._process

        def process(outputs):
            for out in outputs:
                state = server.engine._requests.get(out.request_id)
                if state is not None and out.request_id.startswith("cmpl-") and state.params.seed == 13:
                    state.detokenizer.step = lambda *_, **__: 1 / 0
            real(outputs)
        server.engine.core.sink = process
        body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True}
        bad = httpx.post(server.url + "/v1/completions", json=body | {"seed": 13}, timeout=60)
        good = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert bad.status_code == 500 and "ZeroDivisionError" in bad.json()["error"]["message"]
    assert bad.json()["error"]["code"] == "request_failed" and good.status_code == 200


def test_a_dead_step_loop_fails_everyone_waiting_and_refuses_new_requests(llama):
    async def main():
        engine = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=4096))
        deaths = []
        engine.on_loop_death = deaths.append

        def broken():
            raise RuntimeError("a scheduler bug")
        engine.core.scheduler.schedule = broken
        results = await asyncio.gather(*(_tokens(engine.generate(p, PARAMS)) for p in PROMPTS), return_exceptions=True)
        with pytest.raises(EngineDeadError, match="a scheduler bug"):
            await anext(engine.generate([5, 6], PARAMS))
        return results, deaths, engine.health()
    results, deaths, healthy = asyncio.run(main())
    assert all(isinstance(r, RequestFailedError) and "a scheduler bug" in str(r) for r in results)
    assert len(deaths) == 1 and not healthy
