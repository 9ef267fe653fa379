"""The compiled CPU decode step (server/compiled_decode.py, --compile): a request decoding alone runs the compiled
graph and gives transformers' greedy tokens (Llama, and Mistral across its sliding window, contexts of one to
four cache blocks); batches of several rows, prefill and adapters stay eager; a compile that fails or computes
something else leaves the engine decoding eagerly."""
import asyncio
import logging

import pytest

from server import compiled_decode
from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.sampling import SamplingParams
from tests.conftest import collect, random_prompts, run

GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


def engine(path: str, **kw):
    return in_process_engine(EngineConfig(model=path, max_wait_ms=1, kv_cache_tokens=2048, block_size=16,
                                          compile=True, **kw))


def count_compiled_steps(e) -> list[int]:
    """[steps the compiled graph ran]; the runner's compiled step is wrapped to count them."""
    compiled, count = e.core.runner.compiled_decode, [0]
    assert compiled is not None, "the decode step did not compile"
    run_compiled = compiled.run

    def counting(batch):
        count[0] += 1
        return run_compiled(batch)
    compiled.run = counting
    return count


def one_at_a_time(e, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens, one request after another (each decodes alone); the engine stops after."""
    async def main():
        try:
            return [(await collect(e, p, GREEDY))[0] for p in prompts]
        finally:
            await e.core.shutdown()
    return run(main())


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_request_decoding_alone_runs_the_compiled_step_and_gives_transformers_tokens(checkpoints, hf_reference,
                                                                                        arch):
    # 3 to 50 tokens of context: one to four blocks of 16; mistral's window is 24 tokens
    prompts = random_prompts(3, [3, 17, 36], seed=21)
    e = engine(checkpoints[arch])
    compiled_steps = count_compiled_steps(e)
    ref = hf_reference(arch)
    assert one_at_a_time(e, prompts) == [ref.greedy(p, GREEDY.max_tokens, eos=False) for p in prompts]
    assert compiled_steps[0] == len(prompts) * (GREEDY.max_tokens - 1)   # every decode step after each prefill


def test_a_quantized_model_compiled_reads_lm_head_as_int8_and_gives_the_eager_tokens(llama):
    # --quant int4 --compile rounds lm_head to int8: the compiled step multiplies by its int8 codes and float32
    # scales, the eager steps by the rounded float32 weight
    prompts = random_prompts(2, [9, 30], seed=24)
    e = engine(llama, quant="int4")
    assert e.core.runner.compiled_decode.lm_head_int8
    compiled_steps = count_compiled_steps(e)

    async def main():
        try:
            compiled = [(await collect(e, p, GREEDY))[0] for p in prompts]
            e.core.runner.compiled_decode = None   # the same engine, decoding eagerly from here
            return compiled, [(await collect(e, p, GREEDY))[0] for p in prompts]
        finally:
            await e.core.shutdown()
    compiled, eager = run(main())
    assert compiled == eager
    assert compiled_steps[0] == len(prompts) * (GREEDY.max_tokens - 1)


def test_concurrent_requests_decode_eagerly_and_alone_again_compiled(llama, hf_reference):
    prompts = random_prompts(3, [5, 20, 33], seed=22)
    lengths = [6, 10, 18]   # the batch shrinks to the last request, which then decodes alone
    e = engine(llama)
    compiled_steps = count_compiled_steps(e)

    async def main():
        try:
            return await asyncio.gather(*(
                collect(e, p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                for p, n in zip(prompts, lengths)))
        finally:
            await e.core.shutdown()
    results = [tokens for tokens, _, _ in run(main())]
    ref = hf_reference("llama")
    assert results == [ref.greedy(p, n, eos=False) for p, n in zip(prompts, lengths)]
    assert 0 < compiled_steps[0] < lengths[-1] - 1


def test_a_compiled_step_that_differs_from_eager_is_dropped_with_an_error(llama, monkeypatch, caplog):
    monkeypatch.setattr(compiled_decode.CompiledDecode, "check_against_eager", lambda self: 0.5)
    e = engine(llama)
    assert e.core.runner.compiled_decode is None
    assert "differs from the eager forward by 5.00e-01" in caplog.text
    assert len(one_at_a_time(e, [[5, 6, 7]])[0]) == GREEDY.max_tokens


def test_a_compile_that_fails_leaves_the_engine_decoding_eagerly(llama, hf_reference, monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(compiled_decode.torch, "compile", no_compiler)
    with caplog.at_level(logging.ERROR):
        e = engine(llama)
    assert e.core.runner.compiled_decode is None
    assert "compiling the decode step failed; decoding eagerly" in caplog.text
    assert one_at_a_time(e, [[5, 6, 7]]) == [hf_reference("llama").greedy([5, 6, 7], GREEDY.max_tokens, eos=False)]


def test_a_compiled_step_that_fails_while_serving_is_dropped_and_the_step_rerun_eagerly(llama, hf_reference, caplog):
    e = engine(llama)
    compiled = e.core.runner.compiled_decode
    run_compiled, calls = compiled.run, [0]

    def fails_on_the_third(batch):
        calls[0] += 1
        if calls[0] == 3:   # after writing this step's K/V, as a failure inside the graph would
            run_compiled(batch)
            raise RuntimeError("recompile failed")
        return run_compiled(batch)
    compiled.run = fails_on_the_third
    prompt = random_prompts(1, [20], seed=23)[0]
    with caplog.at_level(logging.ERROR):
        tokens = one_at_a_time(e, [prompt])
    assert tokens == [hf_reference("llama").greedy(prompt, GREEDY.max_tokens, eos=False)]
    assert calls[0] == 3 and e.core.runner.compiled_decode is None
    assert "the compiled decode step failed; decoding eagerly from now on" in caplog.text
