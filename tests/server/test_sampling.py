"""SamplingParams validation and the sampler's maths; seeded reproducibility through the engine."""
import asyncio
import math

import pytest
import torch

from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.sampling import InvalidRequestError, SamplerRow, SamplingParams, filter_logits, sample
from tests.conftest import collect, random_prompts, run


def rows(params: SamplingParams, n: int, seed0: int = 0, output=()):
    return [SamplerRow(params, torch.Generator().manual_seed(seed0 + i), [1, 2, *output], 2, (0,)) for i in range(n)]


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1, "temperature must be between 0 and 100"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("top_k", -5, "top_k must be -1 or 0"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("presence_penalty", 3, "presence_penalty must be between -2 and 2"),
    ("repetition_penalty", 0, "repetition_penalty must be in (0, 10]"),
    ("logprobs", 21, "logprobs must be between 0 and 20"),
    ("stop", [""], "stop must be a list of non-empty strings"),
    ("temperature", float("nan"), "temperature must be between 0 and 100"),
    ("max_tokens", True, "max_tokens must be an integer >= 1"),
    ("stop", 7, "stop must be a string or a list of strings"),
    ("stop_token_ids", "3", "stop_token_ids must be a list of non-negative integers"),
    ("logit_bias", [None], "logit_bias must be an object"),
    ("logit_bias", {"x": 1}, "logit_bias keys must be token ids"),
    ("logit_bias", {"-4": 1}, "logit_bias keys must be token ids"),
    ("logit_bias", {"4": "1"}, "logit_bias values must be numbers"),
])
def test_invalid_params_say_what_is_allowed(field, value, message):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert message in str(info.value) and info.value.param == field


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    greedy = [t.token_id for t in sample(logits, rows(SamplingParams(temperature=0), 64))]
    top1 = [t.token_id for t in sample(logits, rows(SamplingParams(temperature=1.3, top_k=1), 64))]
    assert greedy == top1 == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    kept = filter_logits(probs.log(), torch.tensor([-1, -1, -1]), torch.tensor([0.75, 0.85, 0.97]),
                         torch.zeros(3)).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]


def test_top_k_and_min_p_masks():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert filter_logits(probs.log(), torch.tensor([2]), torch.ones(1), torch.zeros(1)).isfinite().tolist() == \
        [[True, True, False, False]]
    assert filter_logits(probs.log(), torch.tensor([-1]), torch.ones(1), torch.tensor([0.45])).isfinite().tolist() == \
        [[True, True, True, False]]


def test_sampled_frequencies_follow_the_top_p_renormalised_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4).contiguous()
    tokens = [t.token_id for t in sample(logits, rows(SamplingParams(top_p=0.85), n))]
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(freq, expected, atol=0.03), freq


def test_temperature_sharpens_sampling():
    logits = torch.tensor([1.0, 0.0]).expand(3000, 2).contiguous()
    cold = sum(t.token_id == 0 for t in sample(logits, rows(SamplingParams(temperature=0.25), 3000))) / 3000
    expected = 1 / (1 + math.exp(-4))
    assert abs(cold - expected) < 0.02


def test_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SamplerRow(SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                                    frequency_penalty=0.25), torch.Generator(), [0, 1, 2, 2], 2, (3,))
    from server.sampling import _apply_penalties_and_bias
    out = _apply_penalties_and_bias(logits.clone(), [row])
    # repetition: positive /2, negative *2 over prompt+output; then output token 2 (count 2): -0.5 - 2*0.25
    assert out.tolist() == [[1.0, -4.0, 0.5 - 1.0, 0.5]]


def test_logit_bias_and_min_tokens_mask_eos():
    logits = torch.zeros(1, 5)
    biased = sample(logits, [SamplerRow(SamplingParams(temperature=0, logit_bias={3: 5}), torch.Generator(),
                                        [1], 1, (0,))])
    assert biased[0].token_id == 3
    eos_favoured = torch.tensor([[9.0, 0, 0, 0, 1]])
    held = sample(eos_favoured, [SamplerRow(SamplingParams(temperature=0, min_tokens=2), torch.Generator(),
                                            [1], 1, (0,))])
    assert held[0].token_id == 4


def test_logprobs_are_the_model_distribution_with_top_n():
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0]])
    out = sample(logits, [SamplerRow(SamplingParams(temperature=0, logprobs=2), torch.Generator(), [1], 1, (0,))])
    logprobs = torch.log_softmax(logits[0], -1)
    assert out[0].token_id == 0 and out[0].logprob == pytest.approx(logprobs[0].item())
    assert list(out[0].top_logprobs) == [0, 3]
    assert out[0].top_logprobs[3] == pytest.approx(logprobs[3].item())


def test_same_seed_same_tokens_whatever_the_batch(llama):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    prompt = random_prompts(1, [12], seed=9)[0]
    others = random_prompts(6, [4, 20], seed=10)

    def generate(with_others: bool):
        engine = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=2048, max_wait_ms=1))

        async def main():
            extra = [collect(engine, p, SamplingParams(temperature=1.0, max_tokens=20)) for p in others] if with_others else []
            results = await asyncio.gather(collect(engine, prompt, params), *extra)
            return results[0][0]
        return run(main())
    alone, batched = generate(False), generate(True)
    assert alone == batched
    other_seed = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=2048))
    different = run(collect(other_seed, prompt, SamplingParams(**{**params.__dict__, "seed": 99})))[0]
    assert different != alone
