"""InProcessEngineClient end to end on CPU: greedy output equals Hugging Face transformers token for token."""
import asyncio
import os

import pytest

from server.config import EngineConfig
from server.engine_client import InProcessEngineClient, in_process_engine
from server.sampling import InvalidRequestError, SamplingParams
from tests.conftest import collect, random_prompts, run

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_engine(path, **kw) -> InProcessEngineClient:
    return in_process_engine(EngineConfig(model=path, max_wait_ms=1, **kw))


def assert_all_blocks_free(engine: InProcessEngineClient):
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting and not len(engine.core.batcher)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_batch_submitted_together_matches_hf(checkpoints, hf_reference, arch):
    engine = make_engine(checkpoints[arch], kv_cache_tokens=2048)
    prompts = random_prompts(5, [3, 9, 17, 33, 40], seed=1)

    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    results = run(main())
    ref = hf_reference(arch)
    for prompt, (tokens, _, last) in zip(prompts, results):
        assert tokens == ref.greedy(prompt, GREEDY.max_tokens)
        assert last.finished and last.finish_reason in ("stop", "length")
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_staggered_arrivals_while_others_decode_match_hf(checkpoints, hf_reference, arch):
    engine = make_engine(checkpoints[arch], kv_cache_tokens=2048)
    prompts = random_prompts(4, [5, 12, 30], seed=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        results = [None] * len(prompts)
        started = [asyncio.Event() for _ in prompts]

        async def one(i):
            tokens = []
            async for out in engine.generate(prompts[i], params):
                tokens += out.token_ids
                if len(tokens) == 3 * (i + 1) and i + 1 < len(prompts):
                    started[i + 1].set()  # the next request arrives while this one is mid-decode
            results[i] = tokens

        async def staggered(i):
            if i:
                await started[i].wait()
            await one(i)
        await asyncio.gather(*(staggered(i) for i in range(len(prompts))))
        return results
    results = run(main())
    ref = hf_reference(arch)
    for prompt, tokens in zip(prompts, results):
        assert tokens == ref.greedy(prompt, params.max_tokens, eos=False)
    assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_kv_cache_keeps_output_identical(llama, hf_reference):
    # 6 blocks of 16 tokens for 4 sequences that each grow to ~50 tokens: the newest get preempted.
    engine = make_engine(llama, kv_cache_tokens=96)
    prompts = random_prompts(4, [18, 22, 25], seed=3)
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    results = run(main())
    assert engine.core.scheduler.num_preemptions > 0
    ref = hf_reference("llama")
    for prompt, (tokens, _, _) in zip(prompts, results):
        assert tokens == ref.greedy(prompt, params.max_tokens, eos=False)
    assert_all_blocks_free(engine)


def test_prompt_longer_than_the_chunk_budget_is_prefilled_in_chunks(llama, hf_reference):
    engine = make_engine(llama, kv_cache_tokens=2048, max_num_batched_tokens=16)
    long_prompt, short_prompt = random_prompts(1, [70], seed=4)[0], random_prompts(1, [6], seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def main():
        short_steps, long_steps, long_may_start = [], [], asyncio.Event()

        async def consume(prompt, steps, after=None):
            if after is not None:
                await after.wait()
            tokens = []
            async for out in engine.generate(prompt, params):
                tokens += out.token_ids
                steps.append(engine.core.num_steps)
                if len(tokens) == 2:
                    long_may_start.set()
            return tokens
        short, long = await asyncio.gather(
            consume(short_prompt, short_steps),
            consume(long_prompt, long_steps, after=long_may_start))
        return short, long, short_steps, long_steps
    short_tokens, long_tokens, short_steps, long_steps = run(main())
    ref = hf_reference("llama")
    assert long_tokens == ref.greedy(long_prompt, 30, eos=False)
    assert short_tokens == ref.greedy(short_prompt, 30, eos=False)
    # 70 prompt tokens under a 16-token budget (one of them spent on the running decode) take 5 steps,
    # and the running request got a token in each of them.
    during_prefill = [s for s in short_steps if long_steps[0] - 5 < s < long_steps[0]]
    assert len(during_prefill) == 4
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_reports_cached_tokens_and_same_output(llama, hf_reference):
    engine = make_engine(llama, kv_cache_tokens=2048)
    prefix = random_prompts(1, [50], seed=6)[0]           # 3 full blocks and 2 tokens
    first, second = prefix + [7, 8, 9], prefix + [11, 12]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def main():
        a = await collect(engine, first, params)
        b = await collect(engine, second, params)
        return a, b
    (tokens_a, _, last_a), (tokens_b, _, last_b) = run(main())
    assert last_a.num_cached_tokens == 0
    assert last_b.num_cached_tokens >= 48
    ref = hf_reference("llama")
    assert tokens_a == ref.greedy(first, 10, eos=False)
    assert tokens_b == ref.greedy(second, 10, eos=False)
    assert_all_blocks_free(engine)


def test_prefix_cache_shares_blocks_between_concurrent_requests(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)
    system = random_prompts(1, [64], seed=7)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        await collect(engine, system + [5], params)      # warms the cache
        return await asyncio.gather(*(collect(engine, system + [6 + i], params) for i in range(8)))
    results = run(main())
    assert all(last.num_cached_tokens == 64 for _, _, last in results)
    assert_all_blocks_free(engine)


def test_abort_frees_blocks_and_ends_the_stream(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        seen = []
        async for out in engine.generate(random_prompts(1, [40])[0], params, request_id="r1"):
            seen.append(out)
            if len(seen) == 3:
                engine.abort("r1")

        async def client_that_goes_away():
            async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True)):
                pass
        task = asyncio.create_task(client_that_goes_away())
        while engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen
    seen = run(main())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert_all_blocks_free(engine)


def test_a_stop_string_found_while_the_next_step_runs_ends_its_sequence_at_the_stop(llama):
    # tokens are detokenized while the next step computes, so a stop string is seen one step late: the token
    # computed for the stopped sequence in that step must be dropped, and its neighbours must not notice
    engine = make_engine(llama, kv_cache_tokens=2048)
    prompt, other = random_prompts(2, [10], seed=8)

    async def main():
        free_tokens, free_text, _ = await collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30,
                                                                                 ignore_eos=True))
        alone, _, _ = await collect(engine, other, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        start = next(i for i in range(5, len(free_text)) if "\ufffd" not in free_text[i:i + 3])
        stop = free_text[start:start + 3]
        stopped, together = await asyncio.gather(
            collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])),
            collect(engine, other, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
        return free_tokens, stop, stopped, alone, together
    free_tokens, stop, (tokens, text, last), alone, together = run(main())
    decode = engine.tokenizer.decode
    assert tokens == free_tokens[:len(tokens)] and stop in decode(tokens) and stop not in decode(tokens[:-1])
    assert last.num_output_tokens == len(tokens) and last.finish_reason == "stop"
    assert together[0] == alone
    assert_all_blocks_free(engine)


def test_stop_strings_stop_token_ids_and_min_tokens(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)
    prompt = random_prompts(1, [10], seed=8)[0]

    async def main():
        free_tokens, free_text, _ = await collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30,
                                                                                 ignore_eos=True))
        stop = free_text[5:8]
        _, text, last = await collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                                     ignore_eos=True))
        _, _, by_id = await collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                   stop_token_ids=[free_tokens[4]]))
        min_tok, _, _ = await collect(engine, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                     stop_token_ids=[free_tokens[0]], min_tokens=3))
        return free_tokens, free_text, stop, text, last, by_id, min_tok
    free_tokens, free_text, stop, text, last, by_id, min_tok = run(main())
    assert text == free_text[:free_text.index(stop)]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    first_hit = free_tokens.index(free_tokens[4])
    assert by_id.finish_reason == "stop" and by_id.num_output_tokens == first_hit + 1
    assert by_id.stop_reason == free_tokens[4]
    assert len(min_tok) >= 3 and free_tokens[0] not in min_tok[:3]
    assert_all_blocks_free(engine)


def test_invalid_requests_get_clear_errors(llama):
    engine = make_engine(llama, kv_cache_tokens=2048, max_model_len=128)

    async def first_error(prompt, params):
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, prompt, params)
        return info.value

    async def main():
        errors = [await first_error([1] * 200, SamplingParams()),
                  await first_error([1] * 100, SamplingParams(max_tokens=50)),
                  await first_error([], SamplingParams()),
                  await first_error([10**9], SamplingParams())]
        ok, _, _ = await collect(engine, [5, 6], SamplingParams(max_tokens=2))  # still serving
        return errors, ok
    errors, ok = run(main())
    assert "maximum context length is 128" in str(errors[0]) and "200 tokens" in str(errors[0])
    assert "max_tokens must be between 1 and 28" in str(errors[1]) and errors[1].param == "max_tokens"
    assert "must not be empty" in str(errors[2])
    assert "token ids must be integers in [0, " in str(errors[3])
    assert len(ok) == 2
    assert_all_blocks_free(engine)


def test_text_prompt_and_incremental_text_match_full_decode(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tokens, text, last = run(collect(engine, "Hello, café 😀", params))
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert last.num_prompt_tokens == len(engine.tokenizer.encode("Hello, café 😀"))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)
    real_run, calls = engine.core.runner.run, []

    def flaky_run(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_run(batch)
    engine.core.runner.run = flaky_run

    async def main():
        with pytest.raises(RuntimeError, match="failed in the engine: boom"):
            await collect(engine, [5, 6, 7], SamplingParams(max_tokens=3))
        result = await collect(engine, [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        return result, engine.health()
    (tokens, _, _), healthy = run(main())
    assert len(tokens) == 3 and healthy
    assert_all_blocks_free(engine)


def test_a_dead_step_loop_fails_waiting_requests_and_health(llama):
    engine = make_engine(llama, kv_cache_tokens=2048)

    def broken_prepare(out):
        raise MemoryError("simulated")
    engine.core.runner.prepare = broken_prepare

    async def main():
        with pytest.raises(RuntimeError, match="the engine stopped"):
            await asyncio.wait_for(collect(engine, [5, 6, 7], SamplingParams(max_tokens=3)), timeout=10)
        await asyncio.sleep(0)
        return engine.health()
    assert run(main()) is False


def test_max_model_len_beyond_the_model_is_refused(llama):
    with pytest.raises(ValueError, match=r"max_model_len must be at most the model's max_position_embeddings \(512\)"):
        make_engine(llama, kv_cache_tokens=256, max_model_len=4096)


def test_auto_dtype_follows_the_device_and_checkpoint():
    import torch
    from types import SimpleNamespace
    from batching.core import _resolve_dtype
    assert _resolve_dtype("auto", torch.device("cpu"), SimpleNamespace(dtype="bfloat16")) is torch.float32
    assert _resolve_dtype("auto", torch.device("cuda"), SimpleNamespace(dtype="bfloat16")) is torch.bfloat16
    assert _resolve_dtype("auto", torch.device("cuda"), SimpleNamespace(dtype="float32")) is torch.float16
    assert _resolve_dtype("float16", torch.device("cpu"), SimpleNamespace()) is torch.float16


def test_random_mixed_traffic_with_cancellations_and_preemption(llama, hf_reference):
    import random
    rng = random.Random(int(os.environ.get("LMSERVE_SOAK_SEED", 42)))
    engine = make_engine(llama, kv_cache_tokens=256, max_num_batched_tokens=40, max_batch_size=12)
    shared = random_prompts(1, [35], seed=12)[0]
    specs = []
    for i in range(60):
        prompt = (shared[:rng.choice([16, 33])] if rng.random() < 0.4 else []) + random_prompts(1, [1, 7, 20, 45], seed=100 + i)[0]
        greedy = rng.random() < 0.5
        params = SamplingParams(temperature=0 if greedy else 0.9, top_p=0.9, max_tokens=rng.randint(1, 25),
                                ignore_eos=True, seed=i, stop=["zz"] if rng.random() < 0.2 else [])
        cancel_after = rng.choice([None, None, None, 0.0, 0.01, 0.05])
        specs.append((prompt, params, cancel_after))

    async def main():
        async def one(prompt, params, cancel_after):
            await asyncio.sleep(rng.random() * 0.05)
            task = asyncio.create_task(collect(engine, prompt, params))
            if cancel_after is not None:
                await asyncio.sleep(cancel_after)
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return None
        return await asyncio.gather(*(one(*s) for s in specs))
    results = run(main())
    assert engine.core.scheduler.num_preemptions > 0
    ref = hf_reference("llama")
    checked = 0
    for (prompt, params, _), result in zip(specs, results):
        if result is None:
            continue
        tokens, _, last = result
        assert last.finished
        if params.greedy and not params.stop:
            assert tokens == ref.greedy(prompt, params.max_tokens, eos=False)
            checked += 1
    assert checked >= 5
    assert_all_blocks_free(engine)
    assert not engine._requests


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_run_and_agree_with_float32_on_the_first_tokens(llama, dtype):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = random_prompts(1, [20], seed=13)[0]
    full = run(collect(make_engine(llama, kv_cache_tokens=256), prompt, params))[0]
    half_engine = make_engine(llama, kv_cache_tokens=256, dtype=dtype)
    half = run(collect(half_engine, prompt, params))[0]
    assert half_engine.core.runner.kv_caches[0].dtype == getattr(__import__("torch"), dtype)
    assert half[:2] == full[:2]


def test_prompt_logprobs_match_hf_across_chunks_and_bypass_the_prefix_cache(llama, hf_reference):
    import torch
    engine = make_engine(llama, kv_cache_tokens=2048, max_num_batched_tokens=16)
    prompt = random_prompts(1, [40], seed=14)[0]

    async def main():
        await collect(engine, prompt, SamplingParams(max_tokens=1))    # would make the prefix a cache hit
        first = None
        async for out in engine.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2)):
            first = first or out
        return first
    first = run(main())
    assert first.num_cached_tokens == 0
    scored = first.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(hf_reference("llama").model(torch.tensor([prompt])).logits[0].float(), -1)
    for pos in range(1, len(prompt)):
        entry = scored[pos]
        assert entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert list(entry.top_logprobs) == expected[pos - 1].topk(2).indices.tolist()
    assert_all_blocks_free(engine)


def test_the_event_loop_stays_responsive_during_a_long_step(llama):
    import time
    engine = make_engine(llama, kv_cache_tokens=256)
    real_run = engine.core.runner.run

    def slow_run(batch):
        time.sleep(0.3)                       # a long forward pass, in the worker thread
        return real_run(batch)
    engine.core.runner.run = slow_run

    async def main():
        gaps, done = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        tick = asyncio.create_task(ticker())
        await collect(engine, [5, 6, 7], SamplingParams(max_tokens=2))
        done.set()
        await tick
        return gaps
    gaps = run(main())
    assert len(gaps) > 100 and max(gaps) < 0.1


def test_a_request_id_in_use_while_its_prompt_is_tokenized_is_refused():
    # A prompt this long is tokenized on a worker thread: the id must be taken before that await.
    engine = in_process_engine(EngineConfig(model="tiny", kv_cache_tokens=8192, max_wait_ms=1))
    prompt = " token" * 701   # 4,206 characters, 702 tokens
    params = SamplingParams(max_tokens=2, temperature=0)

    async def main():
        first, second = engine.generate(prompt, params, "same"), engine.generate(prompt, params, "same")
        results = await asyncio.gather(anext(first), anext(second), return_exceptions=True)
        for stream in (first, second):
            await stream.aclose()
        return results
    results = run(main())
    refused = [r for r in results if isinstance(r, InvalidRequestError)]
    assert len(refused) == 1 and "already in use" in str(refused[0])
    assert not engine._requests and not engine._starting
