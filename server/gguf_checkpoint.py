"""GGUF (llama.cpp's format) -> our standard Hugging Face checkpoint directory, converted once into the cache.

The file is read with the `gguf` package, llama.cpp's own reader: its metadata becomes config.json (through
transformers' GGUF config mapping), its tensors are dequantized with the package's own dequantization and
renamed to the Hugging Face names, Q and K rows un-permuted as transformers does for llama, and its
tokenizer becomes tokenizer.json by transformers' GGUF tokenizer conversion. The directory then loads
through server/loader.py like any checkpoint, so --quant int8 / int4 applies as to any float model.
"""
import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from server.cache_dir import cache_dir

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # llama.cpp writes Mistral as llama
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_IGNORED = {"rope_freqs.weight"}  # handled through the config's rope scaling (transformers maps it)


class GGUFError(ValueError):
    pass


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file --model names: the file itself, or the one *.gguf in a directory without config.json."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise GGUFError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                            f"pass --model with the one to serve")
        return files[0] if files else None
    return None


def converted_dir(gguf_file: Path) -> Path:
    """The Hugging Face directory for gguf_file in the cache, converted on first use (keyed by path, size, mtime)."""
    gguf_file = gguf_file.resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{gguf_file.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        log.info("converting %s (%.0f MiB) to a Hugging Face checkpoint in %s (once)", gguf_file,
                 stat.st_size / 2**20, target)
        convert(gguf_file, tmp)
        try:
            tmp.rename(target)
        except OSError as e:  # another process finished first, or the cache holds something else there
            if not (target / "config.json").is_file():
                raise GGUFError(f"cannot write the converted checkpoint to {target}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf_file: Path, out: Path):
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files of gguf_file to out."""
    from safetensors.torch import save_file

    reader = _open(gguf_file)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gguf_file.name}: unsupported GGUF architecture {arch!r}; lmserve reads "
                        f"{', '.join(ARCHITECTURES)} (Llama, Mistral and Qwen2 models)")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(TENSOR_TYPES))
    if unsupported:
        raise GGUFError(f"{gguf_file.name}: unsupported GGUF tensor type {', '.join(unsupported)}; "
                        f"lmserve reads {', '.join(TENSOR_TYPES)}")
    config = _hf_config(gguf_file, arch, {t.name for t in reader.tensors})
    tensors = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"{gguf_file.name}: unexpected tensor {t.name!r} for a {arch} model")
        tensors[name] = _tensor(gguf_file, t, arch, config)
    _check_shapes(gguf_file, tensors, config)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = "bfloat16" if any(t.dtype == torch.bfloat16 for t in tensors.values()) else "float16"
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf_file.name})
    tokenizer = _tokenizer(gguf_file)
    tokenizer.save_pretrained(str(out))
    eos = sorted({i for i in (config.eos_token_id, tokenizer.eos_token_id, _chat_end_id(tokenizer))
                  if isinstance(i, int)})
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}, indent=2))


def _open(gguf_file: Path):
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(gguf_file))
        for t in reader.tensors:  # a truncated file fails here, when its last tensors are mapped
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except (ValueError, KeyError, IndexError, OSError, struct.error) as e:
        raise GGUFError(f"{gguf_file} is not a valid GGUF file (corrupt or truncated?): {e}") from None
    return reader


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def _hf_config(gguf_file: Path, arch: str, tensor_names: set[str]):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as e:  # transformers' mapping refuses metadata it cannot read
        raise GGUFError(f"{gguf_file.name}: its metadata does not describe a model lmserve can serve: {e}") from None
    config.architectures = [ARCHITECTURES[arch]]
    config.tie_word_embeddings = "output.weight" not in tensor_names
    return config


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _tensor(gguf_file: Path, t, arch: str, config) -> torch.Tensor:
    from gguf import GGMLQuantizationType, dequantize
    kind = t.tensor_type
    try:
        if kind == GGMLQuantizationType.F32:
            w = np.array(t.data, dtype=np.float32)
        elif kind == GGMLQuantizationType.F16:
            w = np.array(t.data, dtype=np.float16)
        else:
            w = dequantize(t.data, kind)
    except (NotImplementedError, ValueError) as e:
        raise GGUFError(f"{gguf_file.name}: cannot read tensor {t.name} of type {kind.name}: {e}") from None
    if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
        w = _unpermute(w, heads)
    tensor = torch.from_numpy(np.ascontiguousarray(w))
    return tensor.to(torch.bfloat16) if kind == GGMLQuantizationType.BF16 else tensor


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves in Q and K rows; this restores the HF order."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _check_shapes(gguf_file: Path, tensors: dict, config):
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    expected = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + "self_attn.q_proj.weight": (heads * head_dim, d), p + "self_attn.k_proj.weight": (kv * head_dim, d),
                     p + "self_attn.v_proj.weight": (kv * head_dim, d), p + "self_attn.o_proj.weight": (d, heads * head_dim),
                     p + "mlp.gate_proj.weight": (config.intermediate_size, d),
                     p + "mlp.up_proj.weight": (config.intermediate_size, d),
                     p + "mlp.down_proj.weight": (d, config.intermediate_size)}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{gguf_file.name} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise GGUFError(f"{gguf_file.name}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"its metadata says {shape}")


def _tokenizer(gguf_file: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as e:
        raise GGUFError(f"{gguf_file.name}: its tokenizer cannot be converted: {e}") from None


def _chat_end_id(tokenizer) -> int | None:
    """A ChatML template ends each turn with <|im_end|>; generation stops there too."""
    template = tokenizer.chat_template or ""
    if "<|im_end|>" in template:
        token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        return token_id if token_id != tokenizer.unk_token_id else None
    return None
