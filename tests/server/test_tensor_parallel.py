"""Tensor parallelism on the CPU with gloo (server/tensor_parallel.py, server/tp_workers.py): greedy tokens at
--tensor-parallel-size 2 (and 4, where key/value heads repeat over ranks) equal size 1's and transformers', for
every architecture, quantization and LoRA mix; a worker that dies takes the server down with nothing left."""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from bench.processes import start_lmserve
from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.errors import EngineDeadError
from server.sampling import SamplingParams
from server.tp_workers import WorkerStartError
from tests.conftest import collect, random_prompts, run
from tests.server.conftest import LiveServer, MergedReference, metric_sums
from tests.server.test_server_processes import assert_all_gone, descendants, pid_in_log

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def engine(path: str, tp: int, **kw):
    kw.setdefault("kv_cache_tokens", 2048)
    return in_process_engine(EngineConfig(model=path, max_wait_ms=1, tensor_parallel_size=tp, **kw))


def greedy_tokens(path: str, tp: int, prompts, adapters=None, params=GREEDY, **kw) -> list[list[int]]:
    """Every prompt at once (adapters[i]: its LoRA adapter or None); the engine and its workers stop after."""
    e = engine(path, tp, **kw)
    adapters = adapters or [None] * len(prompts)

    async def one(prompt, adapter):
        tokens = []
        async for out in e.generate(prompt, params, adapter=adapter):
            tokens += out.token_ids
        return tokens

    async def main():
        try:
            return await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters)))
        finally:
            await e.core.shutdown()
    results = run(main())
    if tp > 1:   # told to stop, the workers exited cleanly (not killed, not counted as a death)
        assert [p.returncode for p in e.core.tp_workers.processes] == [0] * (tp - 1) and e.core.failure is None
    return results


def worker_pids(pid: int) -> list[int]:
    """The tensor-parallel workers started by process pid."""
    return [child for child in descendants(pid) if b"server.tp_workers" in open(f"/proc/{child}/cmdline", "rb").read()]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_two_ranks_give_transformers_greedy_tokens(checkpoints, hf_reference, arch):
    # mistral's prompts cross its 24-token sliding window; qwen2 has q/k/v biases and tied embeddings
    prompts = random_prompts(4, [3, 17, 33, 40], seed=11)
    ref = hf_reference(arch)
    assert greedy_tokens(checkpoints[arch], 2, prompts) == [ref.greedy(p, GREEDY.max_tokens) for p in prompts]


def test_four_ranks_repeat_the_key_value_heads_and_give_the_same_tokens(llama, hf_reference):
    # 4 query heads and 2 key/value heads: each key/value head lives on two ranks
    prompts = random_prompts(2, [9, 30], seed=12)
    assert greedy_tokens(llama, 4, prompts) == [hf_reference("llama").greedy(p, GREEDY.max_tokens) for p in prompts]


def test_preemption_chunked_prefill_and_prefix_caching_across_ranks(llama, hf_reference):
    # a KV cache too small for all of them (preemption), a token budget smaller than the prompts (chunked
    # prefill), and prompts sharing a 48-token prefix (prefix caching)
    shared = random_prompts(1, [48], seed=13)[0]
    prompts = [shared + tail for tail in random_prompts(6, [5, 9, 14], seed=14)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    e = engine(llama, 2, kv_cache_tokens=160, block_size=16, max_num_batched_tokens=32)

    async def main():
        try:
            first = await collect(e, prompts[0], params)
            rest = await asyncio.gather(*(collect(e, p, params) for p in prompts[1:]))
            return [first[0]] + [r[0] for r in rest], e.core.metrics.render()
        finally:
            await e.core.shutdown()
    results, metrics = run(main())
    ref = hf_reference("llama")
    assert results == [ref.greedy(p, params.max_tokens, eos=False) for p in prompts]
    sums = metric_sums(metrics.decode())
    assert sums["lmserve_num_preemptions_total"] > 0 and sums["lmserve_prefix_cache_hit_ratio"] > 0


def test_a_batch_mixing_two_adapters_and_the_base_equals_peft(llama, peft_adapters, hf_reference):
    prompts = random_prompts(6, [5, 19, 33], seed=15)
    names = [None, "alpha", "beta"] * 2
    results = greedy_tokens(llama, 2, prompts, names, loras=list(peft_adapters.items()), max_loras=2)
    refs = {None: hf_reference("llama")} | {name: MergedReference(llama, path) for name, path in peft_adapters.items()}
    assert results == [refs[n].greedy(p, GREEDY.max_tokens) for p, n in zip(prompts, names)]


# PyTorch's packed int8/int4 CPU kernels compute in bfloat16, and a row-parallel rank's partial sum is rounded
# before the ranks add them: a greedy step whose top two logits are closer than this may go either way.
KERNEL_ROUNDING_MARGIN = 0.02


def assert_same_tokens_while_decisive(path: str, prompts, **kw):
    """Two ranks' greedy tokens equal one rank's up to the first step where one rank's top-1/top-2 logprob
    margin is below KERNEL_ROUNDING_MARGIN (random tiny models decide many steps by less); at least a quarter
    of the tokens must be compared."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    e = engine(path, 1, **kw)

    async def one_rank():
        try:
            return [await collect_logprobs(e, p, params) for p in prompts]
        finally:
            await e.core.shutdown()
    reference = run(one_rank())
    two_ranks = greedy_tokens(path, 2, prompts, params=params, **kw)
    compared = 0
    for (tokens, margins), got in zip(reference, two_ranks):
        n = next((i for i, m in enumerate(margins) if m < KERNEL_ROUNDING_MARGIN), len(tokens))
        assert got[:n] == tokens[:n], (n, got, tokens, [round(m, 4) for m in margins])
        compared += n
    total = sum(len(t) for t, _ in reference)
    assert compared >= total // 4, f"only {compared} of {total} tokens were decisive enough to compare"


async def collect_logprobs(e, prompt, params) -> tuple[list[int], list[float]]:
    tokens, margins = [], []
    async for out in e.generate(prompt, params):
        tokens += out.token_ids
        for scored in out.logprobs:
            top = sorted(scored.top_logprobs.values(), reverse=True)
            margins.append(top[0] - top[1])
    return tokens, margins


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_at_load_two_ranks_give_one_ranks_tokens(llama, quant):
    assert_same_tokens_while_decisive(llama, random_prompts(6, [7, 20, 36], seed=16), quant=quant, quant_group_size=32)


def test_an_act_order_gptq_checkpoint_on_two_ranks_gives_one_ranks_tokens(gptq_checkpoint):
    assert_same_tokens_while_decisive(gptq_checkpoint, random_prompts(6, [7, 20, 36], seed=17))


def test_a_size_that_does_not_split_the_heads_is_refused_before_any_worker_starts(llama):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by the tensor-parallel size 3"):
        engine(llama, 3)
    assert not worker_pids(os.getpid())


def test_sampled_and_prompt_logprobs_across_ranks_equal_one_ranks(llama):
    # the logits of every sampled row and of every scored prompt position are gathered from both ranks
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    prompt = random_prompts(1, [21], seed=18)[0]
    results = {}
    for tp in (1, 2):
        e = engine(llama, tp)

        async def main():
            try:
                return [out async for out in e.generate(prompt, params)]
            finally:
                await e.core.shutdown()
        outs = run(main())
        results[tp] = ([t for o in outs for t in (o.logprobs or [])], outs[0].prompt_logprobs)
    (sampled1, prompt1), (sampled2, prompt2) = results[1], results[2]
    assert [t.token_id for t in sampled2] == [t.token_id for t in sampled1] and len(prompt2) == len(prompt1) == 21
    for a, b in zip(sampled1 + prompt1[1:], sampled2 + prompt2[1:]):
        assert a.top_logprobs.keys() == b.top_logprobs.keys()
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_worker_that_dies_while_idle_turns_health_to_503(llama):
    with LiveServer(llama, tensor_parallel_size=2) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        (worker,) = worker_pids(os.getpid())
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").status_code == 503
        with pytest.raises(EngineDeadError):
            run(collect(server.engine, [5, 6, 7], GREEDY))


def test_a_worker_killed_mid_stream_ends_the_server_non_zero_and_leaves_no_process(llama):
    server = start_lmserve("--model", llama, "--served-model-name", "tiny", "--kv-cache-tokens", "2048",
                           "--tensor-parallel-size", "2")
    try:
        core = pid_in_log(server, r"engine core process (\d+) started")
        deadline = time.monotonic() + 30
        while not worker_pids(core) and time.monotonic() < deadline:
            time.sleep(0.1)
        (worker,) = worker_pids(core)
        pids = descendants(server.proc.pid)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(worker, signal.SIGKILL)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert server.proc.wait(timeout=30) != 0
        assert "tensor-parallel rank 1" in server.output() or "Connection" in server.output()
        assert_all_gone(pids)
    finally:
        server.stop()


def test_a_worker_that_cannot_start_fails_the_start_with_its_reason(llama, tmp_path, monkeypatch):
    # the workers are started as `sys.executable -m server.tp_workers`: here a python that says why and exits
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'CUDA error: out of memory'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("sys.executable", str(fake))
    with pytest.raises(WorkerStartError, match="rank 1 exited while joining the process group: CUDA error: out of memory"):
        engine(llama, 2)
    assert not worker_pids(os.getpid())


def test_the_triton_kernels_run_unchanged_on_each_shard(llama, peft_adapters, hf_reference):
    # each rank's Triton kernels (in Triton's interpreter here) see 2 query heads, 1 key/value head and its
    # slices of the adapter
    prompts = random_prompts(2, [6, 19], seed=19)
    params = SamplingParams(temperature=0, max_tokens=5)
    results = greedy_tokens(llama, 2, prompts, [None, "alpha"], params=params, kernels="triton",
                            loras=[("alpha", peft_adapters["alpha"])])
    assert results == [hf_reference("llama").greedy(prompts[0], params.max_tokens),
                       MergedReference(llama, peft_adapters["alpha"]).greedy(prompts[1], params.max_tokens)]
