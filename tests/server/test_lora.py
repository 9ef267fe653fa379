"""LoRA serving: lmserve's output under an adapter equals peft's merged model, in mixed batches too."""
import asyncio
import json

import pytest
import torch

from server.config import EngineConfig
from server.tiny_model import ensure_tiny_model
from server.engine_client import InProcessEngineClient, in_process_engine
from server.errors import ModelNotFoundError
from server.layers.linear import GPTQLinear, Int8Linear
from server.lora import LoRAError
from server.sampling import SamplingParams
from tests.conftest import QA, TINY, qa_prompt, random_prompts, run
from tests.server.conftest import MergedReference, make_peft_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=12)
def engine_with(path: str, **kw) -> InProcessEngineClient:
    return in_process_engine(EngineConfig(model=path, max_wait_ms=1, kv_cache_tokens=2048, **kw))


def test_adapter_output_equals_peft_merged_model_and_base_is_untouched(llama, peft_adapters, hf_reference):
    engine = engine_with(llama, loras=list(peft_adapters.items()))
    prompts = random_prompts(3, [5, 19, 33], seed=4)
    refs = {name: MergedReference(llama, path) for name, path in peft_adapters.items()}

    async def main():
        return {name: await asyncio.gather(*(collect_with(engine, p, name) for p in prompts))
                for name in [None, "alpha", "beta"]}
    results = run(main())
    for i, prompt in enumerate(prompts):
        assert results[None][i] == hf_reference("llama").greedy(prompt, GREEDY.max_tokens)
        for name, ref in refs.items():
            assert results[name][i] == ref.greedy(prompt, GREEDY.max_tokens), (name, i)
        assert results["alpha"][i] != results[None][i]


async def collect_with(engine, prompt, adapter, params=GREEDY):
    tokens = []
    async for out in engine.generate(prompt, params, adapter=adapter):
        tokens += out.token_ids
    return tokens


def test_a_batch_mixing_base_and_two_adapters_gives_each_request_what_it_gets_alone(llama, peft_adapters):
    engine = engine_with(llama, loras=list(peft_adapters.items()))
    prompts = random_prompts(9, [4, 11, 26], seed=9)
    names = [None, "alpha", "beta"] * 3

    async def main():   # one event loop per engine: its step loop lives on the loop that started it
        solo = [await collect_with(engine, p, n) for p, n in zip(prompts, names)]
        steps_before = engine.core.num_steps
        mixed = await asyncio.gather(*(collect_with(engine, p, n) for p, n in zip(prompts, names)))
        return solo, mixed, engine.core.num_steps - steps_before
    solo, mixed, mixed_steps = run(main())
    assert mixed == solo
    assert mixed_steps < sum(len(t) for t in solo) / 3   # they really shared steps


def test_the_finetuned_adapter_answers_its_questions_when_served_and_the_base_does_not(finetuned_adapter):
    engine = in_process_engine(EngineConfig(model="tiny", loras=[("qa", finetuned_adapter)], max_wait_ms=1))
    params = SamplingParams(temperature=0, max_tokens=12)

    async def answer(question: str, adapter):
        out = [o async for o in engine.generate(qa_prompt(question), params, adapter=adapter)]
        return "".join(o.text for o in out).strip(), [t for o in out for t in o.token_ids]

    async def main():
        return (await asyncio.gather(*(answer(q, "qa") for q, _ in QA)),
                await asyncio.gather(*(answer(q, None) for q, _ in QA)))
    tuned, base = run(main())
    assert [text for text, _ in tuned] == [a for _, a in QA]
    assert not {text for text, _ in base} & {text for text, _ in tuned}
    merged = MergedReference(str(ensure_tiny_model()), finetuned_adapter)
    for (question, _), (_, tokens) in zip(QA, tuned):
        assert tokens == merged.greedy(engine.tokenizer.encode(qa_prompt(question)), len(tokens))


def test_adapters_do_not_share_prefix_cache_with_the_base_or_each_other(llama, peft_adapters):
    engine = engine_with(llama, loras=list(peft_adapters.items()))
    prompt = random_prompts(1, [40], seed=3)[0]

    async def cached(adapter) -> int:
        last = None
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=2), adapter=adapter):
            last = out if last is None else last
        return last.num_cached_tokens

    async def main():
        return [await cached(a) for a in (None, "alpha", "beta", "alpha", None)]
    assert run(main()) == [0, 0, 0, 32, 32]


def test_fewer_slots_than_adapters_evicts_idle_ones_and_queues_the_rest(llama, peft_adapters, tmp_path):
    gamma = make_peft_adapter(llama, tmp_path / "gamma", seed=3, rank=16)
    engine = engine_with(llama, loras=[*peft_adapters.items(), ("gamma", gamma)], max_loras=1)
    prompts = random_prompts(6, [8], seed=5)
    names = ["alpha", "beta", "gamma", "alpha", "gamma", "beta"]

    async def main():
        solo = [await collect_with(engine, p, n) for p, n in zip(prompts, names)]
        return solo, await asyncio.gather(*(collect_with(engine, p, n) for p, n in zip(prompts, names)))
    solo, together = run(main())
    assert together == solo
    assert len(engine.core.lora_pool.resident) == 1 and not engine.core.lora_pool.in_use


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_an_adapter_on_a_quantized_base_equals_peft_merged_onto_the_dequantized_weights(llama, peft_adapters, quant):
    # The delta is added in high precision beside the quantized matmul: exactly peft merging the adapter into
    # a float model that holds the quantized weights.
    engine = engine_with(llama, loras=[("alpha", peft_adapters["alpha"])], quant=quant)
    prompts = random_prompts(2, [9, 21], seed=6)

    async def main():
        return [await collect_with(engine, p, "alpha") for p in prompts]
    reference = MergedReference(llama, peft_adapters["alpha"], weights=_dequantized(engine.core.model))
    assert run(main()) == [reference.greedy(p, GREEDY.max_tokens) for p in prompts]


def _dequantized(model) -> dict[str, torch.Tensor]:
    """The float weights [out, in] each quantized projection computes with, by checkpoint name."""
    weights = {}
    for name, (module, part) in model.checkpoint_parts().items():
        if isinstance(module, (Int8Linear, GPTQLinear)):
            start = module.partition.out_offset(part)
            weights[name + ".weight"] = module.dequantized_weight()[start:start + module.partition.outs[part].size]
    assert weights
    return weights


def test_an_adapter_on_a_bitsandbytes_base_changes_it_as_peft_changes_the_float_base(llama, peft_adapters):
    # LLM.int8 also quantizes activations, so no float model reproduces it exactly. Teacher-forced
    # log-probabilities instead: what the adapter changes on the bnb-int8 base must match what it changes in
    # peft's merged float model.
    prompt = random_prompts(1, [48], seed=6)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        merged, base = (_token_logprobs(MergedReference(llama, a).model(ids).logits[0], prompt)
                        for a in (peft_adapters["alpha"], None))
    engine = engine_with(llama, loras=[("alpha", peft_adapters["alpha"])], quant="bnb-int8")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    async def prompt_logprobs(adapter):
        last = [o async for o in engine.generate(prompt, params, adapter=adapter)][0]
        return torch.tensor([t.logprob for t in last.prompt_logprobs[1:]])

    async def main():
        return await prompt_logprobs("alpha"), await prompt_logprobs(None)
    q_adapter, q_base = run(main())
    want = merged - base
    assert ((q_adapter - q_base) - want).abs().mean() < 0.2 * want.abs().mean()


def _token_logprobs(logits: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    # log p(prompt[i + 1] | prompt[:i + 1]) for every position but the last
    return logits.float().log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize("case,message", [
    ("missing", "adapter_config.json not found"),
    ("pickle", "adapter_model.bin is never loaded"),
    ("rank", "rank r=8 is outside 1..4"),
    ("shape", "the base model needs"),
    ("target", "unexpected tensor"),
    ("dora", "use_dora adapters are not supported")])
def test_bad_adapters_are_refused_with_a_reason(llama, peft_adapters, tmp_path, case, message):
    import shutil
    path = tmp_path / case
    kw = {}
    if case == "missing":
        path.mkdir()
    elif case == "pickle":
        shutil.copytree(peft_adapters["alpha"], path)
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    elif case == "rank":
        shutil.copytree(peft_adapters["alpha"], path)
        kw["max_lora_rank"] = 4
    elif case == "shape":   # an adapter made for a wider model of the same family
        from server.tiny_model import build_checkpoint
        wide = build_checkpoint(tmp_path / "wide", **{**TINY, "hidden_size": 96})
        make_peft_adapter(str(wide), path, seed=1)
    elif case == "target":
        make_peft_adapter(llama, path, seed=1, targets=["q_proj", "lm_head"])
    elif case == "dora":
        shutil.copytree(peft_adapters["alpha"], path)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(LoRAError, match=message):
        engine_with(llama, loras=[("x", str(path))], **kw)


def test_runtime_load_is_confined_to_the_lora_dir_and_unload_waits_for_requests(llama, peft_adapters, tmp_path):
    import shutil
    shutil.copytree(peft_adapters["beta"], tmp_path / "dir" / "beta")
    engine = engine_with(llama, lora_dir=str(tmp_path / "dir"))
    assert list(engine.core.adapters) == ["beta"]     # --lora-dir serves what it holds
    prompt = random_prompts(1, [10], seed=8)[0]

    async def main():
        with pytest.raises(LoRAError, match="outside --lora-dir"):
            await engine.load_adapter("alpha", peft_adapters["alpha"])
        with pytest.raises(LoRAError, match="taken"):
            await engine.load_adapter("beta", "beta")
        shutil.copytree(peft_adapters["alpha"], tmp_path / "dir" / "alpha")
        await engine.load_adapter("alpha2", "alpha")
        long = asyncio.ensure_future(collect_with(engine, prompt, "alpha2", SamplingParams(temperature=0, max_tokens=40,
                                                                                              ignore_eos=True)))
        await asyncio.sleep(0.05)
        unload = asyncio.ensure_future(engine.unload_adapter("alpha2"))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotFoundError):
            await collect_with(engine, prompt, "alpha2")      # refused at once while the unload waits
        assert not unload.done()
        tokens = await long
        await unload
        return tokens
    tokens = run(main())
    assert len(tokens) == 40 and "alpha2" not in engine.core.adapters
    assert tokens[:12] == MergedReference(llama, peft_adapters["alpha"]).greedy(prompt, 12)


def test_the_triton_lora_kernel_serves_a_mixed_batch_like_peft(llama, peft_adapters):
    # On CPU the kernels run in Triton's interpreter: base, alpha (rank 8, all targets), beta (rank 4, q/v) at once.
    engine = engine_with(llama, loras=list(peft_adapters.items()), kernels="triton")
    prompts = random_prompts(3, [6, 13, 9], seed=11)
    names = [None, "alpha", "beta"]
    params = SamplingParams(temperature=0, max_tokens=5)

    async def main():
        return await asyncio.gather(*(collect_with(engine, p, n, params) for p, n in zip(prompts, names)))
    for prompt, name, tokens in zip(prompts, names, run(main())):
        assert tokens == MergedReference(llama, peft_adapters[name] if name else None).greedy(prompt, params.max_tokens)
