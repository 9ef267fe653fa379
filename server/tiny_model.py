"""The tiny model (`--model tiny`): a random-weight Llama checkpoint lmserve builds itself, once, with no network.

It serves tests and CPU throughput benchmarks, and is the fallback when the real default model cannot be had
(server/default_model.py). It is a standard Hugging Face directory (config.json, model.safetensors, tokenizer files with a chat
template), built deterministically into the user cache dir, and loaded through the same code as any
user checkpoint. The tokenizer is a byte-level BPE trained here with the `tokenizers` library.
"""
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.cache_dir import cache_dir

VERSION = "v2"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=2048)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Language models predict the next token from the tokens before it. Each token is a piece of a word.
An inference server keeps a cache of keys and values so that each new token costs one step, not a whole pass.
Requests arrive at random times; a scheduler batches them so the accelerator stays busy and nobody waits long.
Paged attention stores the cache in fixed-size blocks, like pages of virtual memory, and shares common prefixes.
The weather today is sunny with a light breeze from the west. Tomorrow brings clouds and a chance of rain.
She opened the window, looked at the garden, and smiled at the first flowers of spring.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 128 256 512 1024 2048 4096. Dates like 2026-11-24 and times like 09:30.
Questions and answers: What is the capital of France? Paris. How many days are in a week? Seven.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i))\n
{"name": "lmserve", "kind": "server", "ok": true, "values": [1, 2, 3]}
Hello! How can I help you today? Thank you very much. You are welcome. Good morning, good evening, good night.
Punctuation matters: commas, periods, colons; semicolons! Question marks? Quotes "like this" and 'like that'.
Unicode text: café, naïve, façade, Zürich, señor, 東京, 北京, Москва, 😀 🚀 ✨, and math like α + β = γ.
"""


def ensure_tiny_model() -> Path:
    """The tiny model's directory, built on first use."""
    target = cache_dir() / f"default-model-{VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_checkpoint(tmp, **DEFAULT_SHAPE)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained on CORPUS, wrapped as a transformers tokenizer with BOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE)


def build_checkpoint(path: Path, architecture: str = "LlamaForCausalLM", seed: int = 0, std: float = 0.02,
                     num_shards: int = 1, vocab_size: int = 1024, **shape) -> Path:
    """Write a random-weight Llama-family checkpoint with our tokenizer to path (tests use other shapes)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(path))
    config_cls = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig,
                  "Qwen2ForCausalLM": Qwen2Config}[architecture]
    vocab = -(-len(tokenizer) // 64) * 64
    eos = [tokenizer.convert_tokens_to_ids("</s>"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    config = config_cls(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos[0],
                        pad_token_id=tokenizer.pad_token_id, architectures=[architecture], dtype="float32", **shape)
    config.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}, indent=2))
    tensors = random_weights(config, seed, std)
    write_safetensors(path, tensors, num_shards)
    return path


def random_weights(config, seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    qwen2 = config.architectures[0] == "Qwen2ForCausalLM"
    bias = qwen2 or getattr(config, "attention_bias", False)

    def normal(*shape):
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": 1 + normal(d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + normal(d), p + "post_attention_layernorm.weight": 1 + normal(d),
              p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
              p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
              p + "mlp.gate_proj.weight": normal(inter, d), p + "mlp.up_proj.weight": normal(inter, d),
              p + "mlp.down_proj.weight": normal(d, inter)}
        if bias:
            t |= {p + "self_attn.q_proj.bias": normal(q), p + "self_attn.k_proj.bias": normal(kv),
                  p + "self_attn.v_proj.bias": normal(kv)}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = normal(v, d)
    return t


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], num_shards: int):
    names = sorted(tensors)
    if num_shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {n: tensors[n].contiguous() for n in names[k::num_shards]}
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
