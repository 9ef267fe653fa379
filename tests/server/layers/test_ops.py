"""The kernels are chosen once at load; the whole model on the Triton kernels matches Hugging Face."""
import asyncio

import pytest
import torch

from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.layers.ops import select_ops
from server.sampling import SamplingParams
from tests.conftest import collect, random_prompts, run


def test_triton_on_cuda_torch_elsewhere():
    assert select_ops(torch.device("cpu")).name == "torch"
    assert select_ops(torch.device("cuda")).name == "triton"
    assert select_ops(torch.device("cpu"), "triton").name == "triton"
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops(torch.device("cpu"), "cutlass")


def test_triton_on_cpu_outside_the_interpreter_is_refused_at_load(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="run on CUDA devices"):
        select_ops(torch.device("cpu"), "triton")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_engine_on_triton_kernels_matches_hf(checkpoints, hf_reference, arch):
    # On CPU the kernels run in Triton's interpreter: a prefill group, a chunk over a cached prefix, decodes.
    engine = in_process_engine(EngineConfig(model=checkpoints[arch], kernels="triton", max_wait_ms=1,
                                      kv_cache_tokens=512, max_num_batched_tokens=32))
    assert engine.core.model.ops.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=6)
    prompts = random_prompts(3, [5, 40, 11], seed=7)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    ref = hf_reference(arch)
    for prompt, (tokens, _, _) in zip(prompts, run(main())):
        assert tokens == ref.greedy(prompt, params.max_tokens)
