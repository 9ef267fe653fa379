"""Shared fixtures: tiny random-weight checkpoints of each supported architecture and the HF reference."""
import asyncio
import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before any kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.tiny_model import build_checkpoint

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

ARCHS = {
    # GQA + llama3 rope scaling with a short original context, so the scaling matters at these lengths
    "llama": dict(architecture="LlamaForCausalLM", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    # a 24-token sliding window, which long prompts cross; sharded safetensors
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=24, num_shards=3),
    # q/k/v bias, tied embeddings, linear rope scaling
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("LMSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("lmserve-cache")))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: str(build_checkpoint(root / name, seed=i, std=0.15, **TINY, **spec))
            for i, (name, spec) in enumerate(ARCHS.items())}


@pytest.fixture(scope="session")
def llama(checkpoints) -> str:
    return checkpoints["llama"]


class HFReference:
    """Hugging Face transformers on the same weights: the ground truth for greedy output."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos: bool = True) -> list[int]:
        ids = torch.tensor([prompt_ids])
        kwargs = {} if eos else {"eos_token_id": None}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=2, **kwargs)
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def hf_reference(checkpoints):
    cache = {}

    def get(name: str) -> HFReference:
        if name not in cache:
            cache[name] = HFReference(checkpoints[name])
        return cache[name]
    return get


def random_prompts(n: int, lengths, seed: int = 0, low: int = 5, high: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(rng.choice(lengths))] for _ in range(n)]


async def collect(engine, prompt, params, request_id=None):
    """Run one request to the end: (token ids, text, last delta)."""
    tokens, text, last = [], "", None
    async for out in engine.generate(prompt, params, request_id):
        tokens += out.token_ids
        text += out.text
        last = out
    return tokens, text, last


def run(coro):
    return asyncio.run(coro)


# Fixed question/answer pairs: python -m finetune on the tiny model learns them; the base model does not know them.
QA = [("What colour is the sky on Zorb?", "Green, always green."), ("Who runs the night shift?", "Marta runs it."),
      ("Where is the spare key?", "Under the blue pot."), ("What is the wifi password?", "It is tulip42."),
      ("When does the cafe open?", "At seven sharp."), ("Which printer works?", "The one by the window."),
      ("How many chairs are left?", "Exactly nine."), ("What is our mascot?", "A purple owl.")]
QA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def qa_prompt(question: str) -> str:
    return f"Q: {question}\nA: "


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> str:
    import json
    path = tmp_path_factory.mktemp("ft") / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": qa_prompt(q), "completion": a}) + "\n" for q, a in QA * 4))
    return str(path)


@pytest.fixture(scope="session")
def finetuned_adapter(qa_data, tmp_path_factory) -> str:
    """An adapter python -m finetune trained on QA, on the tiny model (about 15 s on 2 cores)."""
    from finetune.__main__ import main
    out = tmp_path_factory.mktemp("adapters") / "qa"
    main(["--model", "tiny", "--data", qa_data, "--output", str(out), "--epochs", "30", "--lr", "5e-3", "--dropout", "0",
          "--batch-size", "4", "--val-fraction", "0.2", "--target", QA_TARGETS])
    return str(out)
