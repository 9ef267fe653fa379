"""python -m server: parse flags, start the engine core process and the API process(es), serve HTTP and gRPC."""
import argparse
import logging
import os
import sys

from batching.core_process import run_event_loop
from server.config import EngineConfig, ServerConfig, from_flags, server_flags_parser

log = logging.getLogger("lmserve")


def parse_args(argv=None) -> argparse.Namespace:
    return server_flags_parser("python -m server", "lmserve: serve a Llama-family model.").parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return from_flags(EngineConfig, args)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return from_flags(ServerConfig, args)


async def serve(config: EngineConfig, args: ServerConfig):
    """The first API process: starts the engine core (a process of its own unless --engine-in-process), the other
    --api-server-count - 1 API processes, and serves HTTP and gRPC itself; exits non-zero when any of them dies."""
    import torch

    from server.api_server import serve_api, start_api_server
    from server.auth import build_access
    from server.engine_client import in_process_engine
    from server.mp_engine_client import MultiprocessEngineClient, start_engine_core

    core = None
    try:
        access = build_access(args.api_key, args.api_keys_file, args.audit_log)
        if args.engine_in_process:
            engine, address = in_process_engine(config), None
        else:
            core, address = start_engine_core(config, args.log_level, args.api_server_count)
            torch.set_num_threads(1)   # the model runs in the core; this process only parses and writes
            log.info("engine core process %d started; loading the model", core.pid)
            engine = await MultiprocessEngineClient.connect(address, config.log_requests, core)
    except (ValueError, OSError) as e:  # a bad checkpoint, quantization, kernel choice or keys file: say what
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:   # the engine core process exited while loading; with code 1 it said why itself
        raise SystemExit(1 if core is not None and core.exitcode == 1 else f"error: {e}") from None
    if access.enabled:
        log.info("API keys required (%s)", ", ".join(f"{k.id} {k.role}" for k in access.keys))
    workers = [start_api_server(args, address, i, config.log_requests) for i in range(1, args.api_server_count)]
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
        config, server = engine_config(args), server_config(args)   # validated before anything loads
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        run_event_loop(serve(config, server))
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
