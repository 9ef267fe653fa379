"""--model random:NAME: real shapes, random weights made on the device, the same weights transformers gets."""
import pytest
import torch

from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.sampling import SamplingParams
from server.synthetic_model import SHAPES, hf_model_for, synthetic_dir
from tests.conftest import collect, run


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_random_tiny_serves_what_transformers_computes_on_the_same_weights(quant):
    engine = in_process_engine(EngineConfig(model="random:tiny", kv_cache_tokens=1024, quant=quant))
    assert engine.model_name == "random:tiny" and engine.vocab_size == SHAPES["tiny"]["vocab_size"]
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    assert len(set(prompt)) == len(prompt)          # the corpus's words are real tokens, not <unk>
    tokens, _, _ = run(collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    hf = hf_model_for("random:tiny", torch.float32, torch.device("cpu"))
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert tokens == expected[0, len(prompt):].tolist()


def test_the_directory_holds_a_full_vocabulary_and_no_weights():
    path = synthetic_dir("random:llama-2-7b")
    from transformers import AutoConfig, AutoTokenizer
    assert AutoConfig.from_pretrained(path).intermediate_size == 11008
    assert len(AutoTokenizer.from_pretrained(path)) == 32000
    assert not list(path.glob("*.safetensors"))


def test_unknown_name_says_what_exists():
    with pytest.raises(ValueError, match="llama-2-7b"):
        in_process_engine(EngineConfig(model="random:gpt-9"))


def test_tied_lm_head_is_the_embedding_transformers_has():
    from server.loader import load_model
    assert SHAPES["smollm2-135m"]["tie_word_embeddings"]
    model = load_model(synthetic_dir("random:smollm2-135m"), torch.float32, torch.device("cpu"), 64)
    expected = hf_model_for("random:smollm2-135m", torch.float32, torch.device("cpu")).lm_head.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, expected)
