"""GGUF checkpoints: lmserve's greedy tokens equal transformers' own GGUF loading on the same file, per tensor type.

The files are written here with the `gguf` package's writer from a tiny random-weight checkpoint, the way
llama.cpp's converter writes them (Q and K rows permuted for llama, tokenizer and chat template in the
metadata), so the test also checks the conversion back against the original weights.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.gguf_checkpoint import GGUFError, convert, find_gguf
from server.model_source import resolve_model
from server.sampling import SamplingParams
from server.tiny_model import build_checkpoint
from tests.conftest import TINY, collect, random_prompts, run

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
MARGIN = 1e-3   # reference steps whose top-1 / top-2 logits are closer than this may flip on rounding alone
ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q and K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(checkpoint: Path, out: Path, qtype, ignore_vocab_tail: bool = False) -> Path:
    """checkpoint (a Hugging Face directory of ours) as a GGUF file whose 2-D weights are of type qtype."""
    from safetensors.torch import load_file
    config = json.loads((checkpoint / "config.json").read_text())
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    arch = ARCH[config["architectures"][0]]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    tokens = [f"[PAD{i}]" for i in range(config["vocab_size"])]
    for text, i in vocab.items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special or t.startswith("[PAD") else 1 for i, t in enumerate(tokens)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(tok_config.get("chat_template") or (checkpoint / "chat_template.jinja").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, t in sorted(load_file(str(checkpoint / "model.safetensors")).items()):
        a = t.float().numpy()
        if name.endswith("q_proj.weight") and arch == "llama":
            a = _permute(a, heads)
        elif name.endswith("k_proj.weight") and arch == "llama":
            a = _permute(a, kv_heads)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, *module, leaf = name.split(".")
            gname = f"blk.{layer}.{LAYER['.'.join(module)]}.{leaf}"
        if a.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a.astype(np.float16) if a.ndim == 2 and qtype == Q.F16 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-src")
    return {"llama": build_checkpoint(root / "llama", seed=5, std=0.15, **TINY),
            "qwen2": build_checkpoint(root / "qwen2", architecture="Qwen2ForCausalLM", seed=6, std=0.15,
                                      tie_word_embeddings=True, **TINY)}


def reference_tokens(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """transformers' greedy tokens, and how many of them came from steps with a top-1/top-2 margin >= MARGIN."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    for step, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        if top2[0] - top2[1] < MARGIN:
            return tokens, step
    return tokens, len(tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_greedy_tokens_equal_transformers_gguf_loading(tiny_checkpoints, tmp_path, monkeypatch, arch, qtype):
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    file = write_gguf(tiny_checkpoints[arch], tmp_path / f"tiny-{qtype}.gguf", getattr(Q, qtype))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=file.name, dtype=torch.float32).eval()
    engine = in_process_engine(EngineConfig(model=str(file), kv_cache_tokens=4096, max_wait_ms=1))
    assert engine.model_name == f"tiny-{qtype}"
    prompts = random_prompts(4, [3, 17, 40], seed=11)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def all_at_once():
        import asyncio
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    covered = 0
    for prompt, (tokens, _, _) in zip(prompts, run(all_at_once())):
        expected, n = reference_tokens(reference, prompt, 24)
        assert tokens[:n] == expected[:n]
        covered += n
    assert covered >= 0.75 * 24 * len(prompts), f"only {covered} tokens had a clear reference margin"
    print(f"{arch} {qtype}: {covered} of {24 * len(prompts)} tokens compared")


def test_float32_gguf_round_trips_the_original_weights(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file
    file = write_gguf(tiny_checkpoints["llama"], tmp_path / "tiny.gguf", Q.F32)
    convert(file, tmp_path / "hf")
    original = load_file(str(tiny_checkpoints["llama"] / "model.safetensors"))
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(converted) == set(original)
    for name, t in original.items():
        assert torch.equal(converted[name], t), name
    from transformers import AutoTokenizer
    ours, theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf")), AutoTokenizer.from_pretrained(
        str(tiny_checkpoints["llama"]))
    text = "Hello world! café 😀 <|im_start|>user"
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_bad_files_are_clear_errors(tiny_checkpoints, tmp_path):
    good = write_gguf(tiny_checkpoints["llama"], tmp_path / "good.gguf", Q.Q8_0)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    for bad in (truncated, garbage):
        with pytest.raises(GGUFError, match="not a valid GGUF file"):
            convert(bad, tmp_path / "out")
    with pytest.raises(GGUFError, match="holds 3 GGUF files"):
        find_gguf(tmp_path)


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path):
    arch = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    arch.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    kind = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    shape = gguf.quants.quant_shape_to_byte_shape((4, 256), Q.IQ2_XXS)
    kind.add_tensor("token_embd.weight", np.zeros(shape, dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    for w in (arch, kind):
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        convert(tmp_path / "gpt2.gguf", tmp_path / "out")
    with pytest.raises(GGUFError, match="unsupported GGUF tensor type IQ2_XXS"):
        convert(tmp_path / "iq.gguf", tmp_path / "out")


def test_model_flag_takes_a_gguf_file_or_its_directory(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "my-model"
    folder.mkdir()
    file = write_gguf(tiny_checkpoints["llama"], folder / "weights.Q8_0.gguf", Q.Q8_0)
    by_file, by_dir = resolve_model(str(file)), resolve_model(str(folder))
    assert by_file.path == by_dir.path   # converted once
    assert (by_file.name, by_dir.name) == ("weights.Q8_0", "my-model")
    assert (Path(by_file.path) / "model.safetensors").is_file()
