"""Load a Hugging Face checkpoint directory into our model: config via transformers, weights from safetensors only."""
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from server.models.llama import LlamaForCausalLM
from server.models.model_config import ModelConfig

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


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int) -> LlamaForCausalLM:
    path = Path(path)
    cfg = ModelConfig.from_hf(load_hf_config(path))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the serving dtype, never as a float32 copy first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name not in params:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {cfg.architecture}")
                tensor = f.get_tensor(name)
                param = params[name]
                if tensor.shape != param.shape:
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.data.copy_(tensor)
                loaded.add(name)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    log.info("loaded %s from %s (%d tensors)", cfg.architecture, path, len(loaded))
    return model.eval()
