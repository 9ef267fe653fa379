"""Loader: sharded safetensors, our logits equal HF's, clear errors for what is not supported."""
import json
import shutil

import pytest
import torch

from server.loader import CheckpointError, load_model
from server.models.model_config import UnsupportedModelError
from tests.conftest import random_prompts


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_logits_match_hf_for_a_full_prompt(checkpoints, hf_reference, arch, packed, monkeypatch):
    from batching.scheduler import ScheduledSequence, SchedulerOutput
    from batching.kv_cache import BlockManager
    from server.model_runner import ModelRunner
    from server.sampling import SamplingParams
    from batching.sequence import Sequence

    if not packed:   # too little memory for the oneDNN-packed copies: the 60 rows run F.linear
        monkeypatch.setattr("server.loader.available_host_memory", lambda: 0)
    model = load_model(checkpoints[arch], torch.float32, torch.device("cpu"), 512)
    assert (model.lm_head.cpu_weight.packed is not None) == (packed and torch.backends.mkldnn.is_available())
    cfg = model.config
    caches = [torch.zeros(2, 17, 16, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]  # + padding
    runner = ModelRunner(model, caches, 16, torch.device("cpu"), (1,))
    prompt = random_prompts(1, [60], seed=11)[0]          # longer than mistral's 24-token window
    s = Sequence("x", prompt, SamplingParams(), torch.Generator(), 4)
    bm = BlockManager(16, 16)
    bm.allocate(s, bm.find_prefix(s), len(prompt))
    batch = runner.prepare(SchedulerOutput([ScheduledSequence(s, len(prompt))]))
    with torch.inference_mode():
        hidden = model(batch.input_ids, batch.positions, caches, batch.meta)
        ours = model.compute_logits(hidden)
        theirs = hf_reference(arch).model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_float_weights_are_not_packed_where_a_copy_does_not_fit(llama, monkeypatch, caplog):
    monkeypatch.setattr("server.loader.available_host_memory", lambda: 0)
    with caplog.at_level("WARNING", logger="server.loader"):
        model = load_model(llama, torch.float32, torch.device("cpu"), 512)
    layers = [m for m in model.modules() if hasattr(m, "cpu_weight")]
    assert layers and all(m.cpu_weight is None or m.cpu_weight.packed is None for m in layers)
    assert "not packing the float weights" in caplog.text


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2's lm_head is tied to the embedding table
def test_int8_lm_head_rounds_a_quantized_cpu_models_lm_head_per_row(checkpoints, arch, quant):
    cpu = torch.device("cpu")
    model = load_model(checkpoints[arch], torch.float32, cpu, 64, quant=quant, int8_lm_head=True)
    float_model = load_model(checkpoints[arch], torch.float32, cpu, 64, int8_lm_head=True)
    rows, weight = model.lm_head.int8_rows, model.lm_head.weight
    assert float_model.lm_head.int8_rows is None
    assert load_model(checkpoints[arch], torch.float32, cpu, 64, quant=quant).lm_head.int8_rows is None
    assert rows.codes.dtype == torch.int8 and (rows.codes.abs().amax(dim=1) == 127).all()
    assert torch.equal(weight, rows.codes.float() * rows.scales[:, None])   # what every path computes with
    assert ((weight - float_model.lm_head.weight).abs() <= rows.scales[:, None] / 2 + 1e-7).all()
    embedding = model.model.embed_tokens.weight
    assert (embedding is weight) == (arch == "qwen2")
    if arch != "qwen2":
        assert torch.equal(embedding, float_model.model.embed_tokens.weight)


def test_a_gptq_checkpoint_keeps_its_float_lm_head(gptq_checkpoint):
    model = load_model(gptq_checkpoint, torch.float32, torch.device("cpu"), 64, int8_lm_head=True)
    assert model.lm_head.int8_rows is None


def test_unsupported_architecture_names_what_is_supported(llama, tmp_path):
    shutil.copytree(llama, tmp_path / "m", dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64)


def test_pickled_weights_are_refused(llama, tmp_path):
    shutil.copytree(llama, tmp_path / "m", dirs_exist_ok=True)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickled weights"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64)


def test_missing_tensor_and_not_a_checkpoint_are_clear_errors(llama, tmp_path):
    from safetensors.torch import load_file, save_file
    shutil.copytree(llama, tmp_path / "m", dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. model.norm.weight"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path, torch.float32, torch.device("cpu"), 64)


def test_unsupported_rope_scaling_is_named(llama, tmp_path):
    shutil.copytree(llama, tmp_path / "m", dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported rope_scaling type 'dynamic'"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64)


def test_a_quantized_tensor_in_a_float_checkpoint_is_refused_under_quant(llama, tmp_path):
    from safetensors.torch import load_file, save_file
    shutil.copytree(llama, tmp_path / "m", dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.scales"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.scales'"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64, quant="int8")


def test_a_gptq_g_idx_naming_a_group_that_does_not_exist_is_refused(gptq_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    shutil.copytree(gptq_checkpoint, tmp_path / "m", dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name in ("q_proj", "k_proj", "v_proj"):   # the same g_idx for the fused projections, one group too far
        tensors[f"model.layers.0.self_attn.{name}.g_idx"][0] = 99
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"qkv_proj: g_idx names groups outside 0..1"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"), 64)
