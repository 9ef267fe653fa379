"""EngineConfig: every engine knob in one validated dataclass (the CLI fills it, tests build it directly)."""
from dataclasses import dataclass, field

from server.layers.ops import KERNEL_CHOICES
from server.quantization.config import QUANT_CHOICES

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EngineConfig:
    model: str | None = None              # HF checkpoint directory; None serves the embedded default model
    served_model_name: str | None = None  # the name clients send as `model`; default: the directory's name
    dtype: str = "auto"                   # auto: float32 on CPU, the checkpoint's dtype on CUDA
    device: str = "auto"                  # auto: cuda when available, else cpu
    max_batch_size: int = 64              # most sequences in one engine step; the batcher releases at this count
    max_wait_ms: float = 5.0              # longest a new request waits for others to batch with
    max_num_batched_tokens: int = 2048    # token budget per step; longer prompts are prefilled in chunks
    max_model_len: int | None = None      # context length; default from the checkpoint's config
    block_size: int = 16                  # tokens per KV cache block
    kv_cache_tokens: int | None = None    # KV cache size in tokens; overrides kv_cache_memory_fraction
    kv_cache_memory_fraction: float | None = None  # share of free memory for the KV cache (default 0.9 CUDA; CPU: see size_kv_cache)
    enable_prefix_caching: bool = True
    seed: int = 0                         # seeds requests that bring no seed of their own
    quant: str = "none"                   # none | int8 | int4 | bnb-int8 | nf4; GPTQ checkpoints are detected
    quant_group_size: int = 128           # input channels per scale group for --quant int4 (-1: whole row)
    kernels: str = "auto"                 # auto: Triton kernels on CUDA, torch references elsewhere
    enforce_eager: bool = False           # never replay decode steps through CUDA graphs (they are captured on CUDA)
    loras: list[tuple[str, str]] = field(default_factory=list)  # (name, path) of LoRA adapters loaded at start
    lora_dir: str | None = None           # adapters in it load at start; runtime loads must come from inside it
    max_loras: int = 8                    # adapters resident on the device at once (least recently used evicted)
    max_lora_rank: int = 64               # the largest adapter rank accepted
    max_queued_requests: int | None = None  # requests waiting to start past which new ones are refused (None: no bound)
    request_timeout: float | None = None  # seconds a request may take from arrival to its end (None: no limit)
    log_requests: bool = False            # log each finished request's prompt and output, personal data masked

    def __post_init__(self):
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}; got {self.quant!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}; got {self.kernels!r}")
        if self.quant_group_size != -1 and (self.quant_group_size < 8 or self.quant_group_size % 8):
            raise ValueError(f"quant_group_size must be -1 or a positive multiple of 8; got {self.quant_group_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
        _check_positive("max_batch_size", self.max_batch_size)
        _check_positive("max_loras", self.max_loras)
        _check_positive("max_lora_rank", self.max_lora_rank)
        if self.max_queued_requests is not None:
            _check_positive("max_queued_requests", self.max_queued_requests)
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive seconds; got {self.request_timeout}")
        names = [name for name, _ in self.loras]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ValueError(f"LoRA adapter names must be non-empty and distinct; got {', '.join(names)}")
        _check_positive("block_size", self.block_size)
        _check_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0; got {self.max_wait_ms}")
        if self.max_model_len is not None:
            _check_positive("max_model_len", self.max_model_len)
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be at least block_size ({self.block_size}); got {self.kv_cache_tokens}")
        if self.kv_cache_memory_fraction is not None and not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1]; got {self.kv_cache_memory_fraction}")


def _check_positive(name: str, value: int):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
