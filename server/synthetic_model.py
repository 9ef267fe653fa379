"""`--model random:NAME`: a real model's shapes with random weights made on the device, for benchmarks.

A 7B model can then be measured where no checkpoint can be downloaded. The directory it lives in holds a
config.json, generation_config.json and a word-level tokenizer of the model's full vocabulary, but no
weights: the loader sees the marker file and fills every tensor from a generator seeded by the tensor's name,
so lmserve and the transformers baseline of bench.compare compute with the same weights.
"""
import json
import zlib
from pathlib import Path

import torch

PREFIX = "random:"
MARKER = "lmserve-synthetic.json"
STD = 0.02
SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def is_synthetic(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def synthetic_dir(model: str) -> Path:
    """The directory for random:NAME (config and tokenizer, no weights), written on first use."""
    from server.cache_dir import cache_dir
    from server.tiny_model import CHAT_TEMPLATE
    name = model[len(PREFIX):]
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {model!r}; choose random:NAME with NAME one of {', '.join(SHAPES)}")
    path = cache_dir() / f"synthetic-{name}"
    if (path / MARKER).is_file():
        return path
    from transformers import LlamaConfig
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(SHAPES[name]["vocab_size"], CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(path))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(**SHAPES[name], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                         architectures=["LlamaForCausalLM"], dtype="float16")
    config.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<s>"], "eos_token_id": [ids["</s>"], ids["<|im_end|>"]], "pad_token_id": ids["<pad>"]}))
    (path / MARKER).write_text(json.dumps({"name": name, "std": STD}))
    return path


def word_tokenizer(vocab_size: int, chat_template: str):
    """A word-level tokenizer of exactly vocab_size tokens: specials, the default corpus's words, then fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from server.tiny_model import CORPUS
    words = list(dict.fromkeys(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(CORPUS)))
    vocab = SPECIAL_TOKENS + words
    vocab += [f"w{i}" for i in range(len(vocab), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab[:vocab_size])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:],
                                   chat_template=chat_template)


def is_synthetic_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def synthetic_tensor(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor `name` of every synthetic model: norms are ones, everything else N(0, STD) from a generator
    seeded by the name, drawn on the device (a 7B model's weights take seconds on a GPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32 if dtype not in (torch.float16, torch.bfloat16) else dtype,
                       device=device).normal_(0.0, STD, generator=g).to(dtype)


def hf_model_for(model: str, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM with the weights lmserve's loader gives random:NAME."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(synthetic_dir(model)))
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(synthetic_tensor(name, p.shape, p.dtype, device))
    return hf
