"""Load a Hugging Face checkpoint directory into our model: config via transformers, weights from safetensors only.

Float checkpoints load as they are, or are quantized layer by layer as their weights arrive (--quant);
GPTQ checkpoints (auto-gptq / GPTQModel / optimum) are detected and their packed tensors read by name. Each
checkpoint projection goes to its part of the model's layers (fused q/k/v and gate/up), and under tensor
parallelism each rank copies only its share (server/layers/partition.py).
"""
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from batching.kv_cache import available_host_memory
from server.layers.linear import LinearFactory, weight_bytes
from server.layers.partition import Partitioned
from server.layers.ops import select_ops
from server.models.llama import LlamaForCausalLM
from server.models.model_config import ModelConfig
from server.quantization.config import gptq_config_in, resolve_quant
from server.synthetic_model import is_synthetic_dir, synthetic_tensor
from server.tensor_parallel import SINGLE, TensorParallel

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the forward pass recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The --quant modes whose compiled CPU decode step reads lm_head as int8 (load_model's int8_lm_head). GPTQ
# checkpoints keep the float lm_head they were written with, as auto-gptq does.
_LM_HEAD_INT8_QUANTS = ("int8", "int4")


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
               quant: str = "none", group_size: int = 128, kernels: str = "auto",
               tp: TensorParallel = SINGLE, int8_lm_head: bool = False) -> LlamaForCausalLM:
    """The model, or this rank's share of it (tp), loaded from a checkpoint directory. int8_lm_head: a CPU model
    quantized by --quant int8/int4 whose decode step will compile rounds lm_head (and an embedding tied to it) to
    int8 per row too, as llama.cpp and gpt-fast quantize the output matrix: the compiled step reads the codes, a
    quarter of the float32 bytes, and the eager steps the same rounded weight."""
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
            model = LlamaForCausalLM(cfg, max_positions, linear, tp)
    except ValueError as e:   # shapes this tensor-parallel size or quantization cannot split
        raise CheckpointError(f"{path}: {e}") from None
    finally:
        torch.set_default_dtype(default_dtype)
    parts = model.checkpoint_parts()
    gptq = checkpoint_quant is not None
    held = {name for name, m in model.named_modules() if isinstance(m, Partitioned)}
    plain = {name: p for name, p in model.named_parameters(remove_duplicate=False) if name.rpartition(".")[0] not in held}
    expected = set(plain)
    for module_name, (m, _) in parts.items():
        leaves = m.QUANTIZED_LEAVES if gptq and m.QUANTIZED_LEAVES else ("weight",)
        expected |= {f"{module_name}.{leaf}" for leaf in leaves + (("bias",) if getattr(m, "bias", None) is not None else ())}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")  # the embedding table, filled under its own name
    if is_synthetic_dir(path):
        loaded = _fill_synthetic(expected, parts, plain, dtype, device)
    else:
        loaded = _read_checkpoint(path, cfg, parts, plain, gptq, quant_config)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for name, module in model.named_modules():
        if hasattr(module, "finish_loading"):
            try:
                module.finish_loading()
            except ValueError as e:   # what the tensors say together: g_idx out of range, fused parts that disagree
                raise CheckpointError(f"checkpoint {path}: {name}: {e}") from None
    cpu_torch = device.type == "cpu" and linear.ops.name == "torch"
    if int8_lm_head and cpu_torch and quant in _LM_HEAD_INT8_QUANTS:
        model.lm_head.round_to_int8()
    packed = _use_cpu_matmuls(model) if cpu_torch else 0
    model.weight_bytes = weight_bytes(model)
    model.linear_weight_bytes = sum(weight_bytes(m) for name, m in model.named_modules()
                                    if name.endswith("_proj") and "." in name)
    quant_label = quant_config.method if quant_config else "no quantization"
    if model.lm_head.int8_rows is not None:
        quant_label += ", lm_head rounded to int8"
    log.info("loaded %s from %s (%d tensors, %s, %s kernels%s): weights %.1f MiB, of which linear layers %.1f MiB%s",
             cfg.architecture, path, len(loaded), quant_label,
             linear.ops.name, f", tensor-parallel rank {tp.rank} of {tp.size}" if tp.size > 1 else "",
             model.weight_bytes / 2**20, model.linear_weight_bytes / 2**20,
             f"; plus {packed / 2**20:.1f} MiB of oneDNN-packed copies for multi-row matmuls" if packed else "")
    return model.eval()


def _use_cpu_matmuls(model: LlamaForCausalLM) -> int:
    """Gives each float layer its CPU forms (kernels/float_matmul_cpu.py), the oneDNN-packed copies only where
    they fit in half the memory available: a float model too large to hold twice runs F.linear on several rows.
    Returns the bytes of the packed copies."""
    layers = [m for m in model.modules() if hasattr(m, "use_cpu_matmul")]
    float_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers
                      if m.weight is not None and m.weight.dtype in (torch.float32, torch.bfloat16))
    available = available_host_memory()
    pack = float_bytes <= available // 2
    if not pack:
        log.warning("not packing the float weights for oneDNN's multi-row GEMM: a copy of their %.0f MiB would take "
                    "more than half of the %.0f MiB available", float_bytes / 2**20, available / 2**20)
    for m in layers:
        m.use_cpu_matmul(pack)
    return sum(m.cpu_weight.packed.numel() * m.cpu_weight.packed.element_size() for m in layers
               if m.cpu_weight is not None and m.cpu_weight.packed is not None)


def _read_checkpoint(path: Path, cfg: ModelConfig, parts: dict, plain: dict, gptq: bool, quant_config) -> set[str]:
    """Copy every tensor of the checkpoint's safetensors files into its parameter (this rank's share of it);
    returns the names loaded."""
    loaded = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                module_name, _, leaf = name.rpartition(".")
                try:
                    if module_name in parts:
                        m, part = parts[module_name]
                        if leaf == "weight" and not gptq:
                            m.load_float_weight(f.get_tensor(name), part)
                        elif leaf in m.AXES and (leaf != "bias" or m.bias is not None) and (gptq or leaf == "bias"):
                            m.load(leaf, f.get_tensor(name), part)
                        elif leaf == "bias" and _is_zero(f.get_tensor(name)):
                            continue  # auto-gptq writes an all-zero bias for every quantized layer
                        else:
                            raise CheckpointError(f"unexpected tensor {name!r} for {cfg.architecture}"
                                                  + _quant_hint(leaf, quant_config))
                    elif name in plain:
                        tensor = f.get_tensor(name)
                        if tensor.shape != plain[name].shape:
                            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                                  f"expected {tuple(plain[name].shape)}")
                        plain[name].data.copy_(tensor)
                    else:
                        raise CheckpointError(f"unexpected tensor {name!r} for {cfg.architecture}"
                                              + _quant_hint(leaf, quant_config))
                except ValueError as e:   # CheckpointError, and a shape or g_idx the layer refuses
                    raise CheckpointError(f"{file.name}: {e}") from None
                loaded.add(name)
    return loaded


def _fill_synthetic(expected: set[str], parts: dict, plain: dict, dtype: torch.dtype, device: torch.device) -> set[str]:
    """random:NAME (server/synthetic_model.py): every expected tensor drawn whole on the device (so each
    tensor-parallel rank takes its share of the same numbers), quantized layers through their float weight as
    a checkpoint's would be."""
    for name in expected:
        module_name, _, leaf = name.rpartition(".")
        if module_name in parts:
            m, part = parts[module_name]
            if leaf == "weight":
                m.load_float_weight(synthetic_tensor(name, m.full_weight_shape(part), dtype, device), part)
            else:
                m.load(leaf, synthetic_tensor(name, (m.partition.outs[part].full,), dtype, device), part)
        else:
            plain[name].data.copy_(synthetic_tensor(name, plain[name].shape, plain[name].dtype, device))
    return set(expected)


def _is_zero(t: torch.Tensor) -> bool:
    return not bool(t.any())


def _quant_hint(leaf: str, quant_config) -> str:
    if leaf in ("qweight", "qzeros", "scales", "g_idx") and quant_config is None:
        return " (a GPTQ tensor, but the checkpoint declares no quantization_config)"
    if leaf == "weight" and quant_config is not None and quant_config.method == "gptq":
        return " (a float weight in a GPTQ checkpoint)"
    return ""
