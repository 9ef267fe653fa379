"""Load a Hugging Face checkpoint directory into our model: config via transformers, weights from safetensors only.

Float checkpoints load as they are, or are quantized layer by layer as their weights arrive (--quant);
GPTQ checkpoints (auto-gptq / GPTQModel / optimum) are detected and their packed tensors read by name.
"""
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from server.layers.linear import LinearFactory, weight_bytes
from server.layers.ops import select_ops
from server.models.llama import LlamaForCausalLM
from server.models.model_config import ModelConfig
from server.quantization.config import gptq_config_in, resolve_quant
from server.synthetic_model import is_synthetic_dir, synthetic_tensor

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the forward pass recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


def load_hf_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint directory: config.json not found")
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickled)}: lmserve never loads pickled weights; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    return files


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               quant: str = "none", group_size: int = 128, kernels: str = "auto") -> LlamaForCausalLM:
    path = Path(path)
    hf_config = load_hf_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    try:
        checkpoint_quant = gptq_config_in(path, hf_config)
        quant_config = resolve_quant(quant, group_size, checkpoint_quant)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    linear = LinearFactory(quant_config, select_ops(device, kernels))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the serving dtype, never as a float32 copy first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, max_positions, linear)
    finally:
        torch.set_default_dtype(default_dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    # Quantized layers over a float checkpoint take `<layer>.weight` through load_float_weight.
    float_fed = {} if checkpoint_quant else {name: m for name, m in model.named_modules()
                                             if hasattr(m, "load_float_weight")}
    expected = set(params) - {f"{name}.{p}" for name, m in float_fed.items()
                              for p, _ in m.named_parameters(recurse=False) if p != "bias"}
    expected |= {f"{name}.weight" for name in float_fed}
    expected -= {n for n in params if n.endswith(".g_idx")}  # optional: a missing g_idx is the plain grouping
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    expected -= tied  # the embedding table, filled under its own name
    if is_synthetic_dir(path):
        loaded = _fill_synthetic(expected, params, float_fed, dtype, device)
    else:
        loaded = _read_checkpoint(path, cfg, params, float_fed, quant_config)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for module in model.modules():
        if hasattr(module, "finish_loading"):
            module.finish_loading()
    if device.type == "cpu" and linear.ops.name == "torch":
        for module in model.modules():
            if hasattr(module, "fuse_for_cpu"):
                module.fuse_for_cpu()
        for module in model.modules():   # after fusing: the chunks are views of each weight's final storage
            if hasattr(module, "use_cpu_matmul"):
                module.use_cpu_matmul()
    model.weight_bytes = weight_bytes(model)
    model.linear_weight_bytes = sum(weight_bytes(m) for name, m in model.named_modules()
                                    if name.endswith("_proj") and "." in name)
    log.info("loaded %s from %s (%d tensors, %s, %s kernels): weights %.1f MiB, of which linear layers %.1f MiB",
             cfg.architecture, path, len(loaded), quant_config.method if quant_config else "no quantization",
             linear.ops.name, model.weight_bytes / 2**20, model.linear_weight_bytes / 2**20)
    return model.eval()


def _read_checkpoint(path: Path, cfg: ModelConfig, params: dict, float_fed: dict, quant_config) -> set[str]:
    """Copy every tensor of the checkpoint's safetensors files into its parameter; returns the names loaded."""
    loaded = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                module_name, _, leaf = name.rpartition(".")
                if leaf == "weight" and module_name in float_fed:
                    float_fed[module_name].load_float_weight(f.get_tensor(name))
                    loaded.add(name)
                    continue
                if name not in params:
                    if leaf == "bias" and _is_zero(f.get_tensor(name)):
                        continue  # auto-gptq writes an all-zero bias for every quantized layer
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {cfg.architecture}"
                                          + _quant_hint(leaf, quant_config))
                tensor = f.get_tensor(name)
                param = params[name]
                if tensor.shape != param.shape:
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.data.copy_(tensor)
                loaded.add(name)
    return loaded


def _fill_synthetic(expected: set[str], params: dict, float_fed: dict, dtype: torch.dtype,
                    device: torch.device) -> set[str]:
    """random:NAME (server/synthetic_model.py): every expected tensor drawn on the device, quantized layers
    through their float weight as a checkpoint's would be."""
    for name in expected:
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and module_name in float_fed:
            m = float_fed[module_name]
            m.load_float_weight(synthetic_tensor(name, (m.out_features, m.in_features), dtype, device))
        elif name in params:
            params[name].data.copy_(synthetic_tensor(name, params[name].shape, params[name].dtype, device))
    return set(expected)


def _is_zero(t: torch.Tensor) -> bool:
    return not bool(t.any())


def _quant_hint(leaf: str, quant_config) -> str:
    if leaf in ("qweight", "qzeros", "scales", "g_idx") and quant_config is None:
        return " (a GPTQ tensor, but the checkpoint declares no quantization_config)"
    if leaf == "weight" and quant_config is not None and quant_config.method == "gptq":
        return " (a float weight in a GPTQ checkpoint)"
    return ""
