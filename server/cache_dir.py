"""Where lmserve keeps what it builds once: the tiny model, converted GGUF checkpoints, synthetic model configs."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """$LMSERVE_CACHE_DIR, else $XDG_CACHE_HOME/lmserve, else ~/.cache/lmserve."""
    root = os.environ.get("LMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmserve")
    return Path(root)
