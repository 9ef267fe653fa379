"""What --model names, as a Hugging Face checkpoint directory and the name clients send as `model`.

None: the default model (server/default_model.py) as lmserve-default; `tiny`: the tiny random-weight model
(server/tiny_model.py); `random:NAME`: a real model's shapes with random weights (server/synthetic_model.py);
a .gguf file or a directory holding one: converted once into the cache (server/gguf_checkpoint.py);
anything else: a Hugging Face checkpoint directory.
"""
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "lmserve-default"
TINY = "tiny"


@dataclass(frozen=True)
class ModelSource:
    path: str   # a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files)
    name: str   # the served model name unless --served-model-name says otherwise


def resolve_model(model: str | None) -> ModelSource:
    from server.synthetic_model import is_synthetic, synthetic_dir
    if model is None:
        from server.default_model import default_checkpoint
        return ModelSource(str(default_checkpoint()), DEFAULT_NAME)
    if model == TINY:
        from server.tiny_model import ensure_tiny_model
        return ModelSource(str(ensure_tiny_model()), TINY)
    if is_synthetic(model):
        return ModelSource(str(synthetic_dir(model)), model)
    from server.gguf_checkpoint import converted_dir, find_gguf
    gguf = find_gguf(model)
    if gguf is not None:
        name = gguf.stem if Path(model).is_file() else Path(model).resolve().name
        return ModelSource(str(converted_dir(gguf)), name)
    return ModelSource(model, Path(model).resolve().name)
