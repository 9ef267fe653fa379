"""The embedded default model: deterministic, a standard HF checkpoint, served through the normal loader."""
import hashlib

from server.tiny_model import DEFAULT_SHAPE, build_checkpoint, ensure_tiny_model


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path):
    a = build_checkpoint(tmp_path / "a", **DEFAULT_SHAPE)
    b = build_checkpoint(tmp_path / "b", **DEFAULT_SHAPE)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert digest(a / name) == digest(b / name), name


def test_tiny_model_is_cached_and_loads_with_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ensure_tiny_model()
    assert ensure_tiny_model() == path
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert tokenizer.chat_template and tokenizer.decode(tokenizer.encode("café 😀"), skip_special_tokens=True) == "café 😀"
