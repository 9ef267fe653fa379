"""An API process: serves one EngineClient over HTTP (and gRPC in the first one) until a signal drains it.

python -m server runs the first API process; with --api-server-count N it starts N - 1 more (run_api_server),
which join the same engine core and bind the same HTTP port (SO_REUSEPORT). The first one watches the others and
stops the server, non-zero, when one dies.
"""
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys

from server.config import ServerConfig

log = logging.getLogger("lmserve")


def start_api_server(args: ServerConfig, address: str, index: int, log_requests: bool) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=run_api_server, args=(args, address, index, log_requests),
                                                           name=f"lmserve-api-{index}", daemon=True)
    process.start()
    return process


def run_api_server(args: ServerConfig, address: str, index: int, log_requests: bool):
    """Another API process's entry point: HTTP on the shared port, the same engine core; no gRPC."""
    import torch

    from batching.core_process import die_with_parent, run_event_loop
    from server.auth import build_access
    from server.mp_engine_client import MultiprocessEngineClient
    die_with_parent()
    torch.set_num_threads(1)   # the model runs in the engine core; this process only parses and writes
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's Ctrl-C reaches the first API process, which says when
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s api-{index} %(name)s: %(message)s")

    async def serve_worker():
        access = build_access(args.api_key, args.api_keys_file, args.audit_log)
        engine = await MultiprocessEngineClient.connect(address, log_requests, timeout=60)
        await serve_api(args, engine, access, primary=False)
    run_event_loop(serve_worker())


async def serve_api(args: ServerConfig, engine, access, primary: bool,
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
    app = build_app(engine, access, args.max_choices_per_request, args.tool_call_parser, args.reasoning_parser,
                    args.open_metrics)
    config = uvicorn.Config(app, host=args.host, port=args.port,
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
        for worker in workers:   # each API process drains its own requests (SIGUSR1: drain, once)
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGUSR1)
        engine.start_draining()
        if grpc_health is not None:
            await grpc_health.enter_graceful_shutdown()
        if not await engine.wait_until_idle(args.shutdown_timeout):
            log.warning("--shutdown-timeout %g s passed: aborting %d requests", args.shutdown_timeout,
                        engine.num_in_flight)
            engine.abort_all(f"the server shut down (--shutdown-timeout {args.shutdown_timeout:g} s passed)")
            await asyncio.sleep(0.1)   # their streams write the error and end
        for worker in workers:   # they drain for --shutdown-timeout too
            await asyncio.to_thread(worker.join, args.shutdown_timeout + 5)
        server.should_exit = True

    def on_signal(sig: signal.Signals):
        if sig == signal.SIGUSR1:   # the first API process asks this one to drain; a stop signal of its own may too
            if not engine.draining:
                loop.create_task(drain(sig))
        elif engine.draining:  # a second signal: stop now, ending the streams first so none dies mid-write
            engine.abort_all(f"the server was stopped ({sig.name} a second time)")
            server.should_exit = True   # uvicorn's own shutdown then waits at most timeout_graceful_shutdown
        else:
            loop.create_task(drain(sig))

    def reload_keys():
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGHUP)
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
        worker.join(1)   # its sentinel closes a moment before its exit status can be read
        if not engine.draining:
            log.error("API process %s exited with code %s: stopping the server", worker.name, worker.exitcode)
            exit_code = 1
            engine.start_draining()
            engine.abort_all(f"the server stopped: API process {worker.name} exited")
            server.should_exit = True

    engine.on_loop_death = on_engine_death
    if engine.failure is not None:   # the core died while this process was starting
        server.should_exit = True
    for worker in workers:
        loop.add_reader(worker.sentinel, on_worker_exit, worker)
    for sig in (signal.SIGTERM, signal.SIGINT) if primary else (signal.SIGTERM, signal.SIGUSR1):
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
