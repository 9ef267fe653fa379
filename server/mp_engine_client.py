"""MultiprocessEngineClient: an EngineClient whose engine core runs in its own process, over a ZeroMQ socket.

start_engine_core() spawns the core process (batching/core_process.py); connect() joins it from this or any
other API process. Requests and aborts go out as messages; one StepOutputs per engine step comes back and is
turned into text here. The core's end (its process died, or its step loop did) is seen through the socket's
disconnect: every request in flight fails at once, health turns 503 and on_loop_death is called.
"""
import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from batching.messages import (AdapterInfo, Abort, AddRequest, Call, EngineInfo, Reply, StepOutputs, encoder,
                               from_core_decoder)
from server.config import EngineConfig
from server.engine_client import EngineClient
from server.errors import EngineDeadError, error_from_wire
from server.sampling import InvalidRequestError

log = logging.getLogger(__name__)
_RESULT_TYPES = {"info": EngineInfo, "adapters": list[AdapterInfo], "load_adapter": AdapterInfo}


def start_engine_core(config: EngineConfig, log_level: str = "info",
                      api_processes: int = 1) -> tuple[multiprocessing.Process, str]:
    """Spawns the engine core process; returns it and the socket address it will listen on once loaded.
    api_processes: how many API processes will share the machine's cores with it."""
    from batching.core_process import run_engine_core
    folder = tempfile.mkdtemp(prefix="lmserve-engine-")   # mode 0700: only this user reaches the socket in it
    address = f"ipc://{folder}/engine.sock"
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(config, address, log_level, api_processes), name="lmserve-engine-core", daemon=True)
    process.start()
    return process, address


class MultiprocessEngineClient(EngineClient):
    def __init__(self, info: EngineInfo, log_requests: bool, ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket,
                 monitor: zmq.asyncio.Socket, process: multiprocessing.Process | None):
        super().__init__(info, log_requests)
        self._ctx, self._sock, self._monitor, self.process = ctx, sock, monitor, process
        self._calls: dict[int, asyncio.Future] = {}
        self._wire_ids = itertools.count()
        self._wire_prefix = f"{os.getpid():x}-"
        self._call_ids = itertools.count(1)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive(), name="lmserve-engine-receive"),
                       loop.create_task(self._watch(), name="lmserve-engine-watch")]

    @classmethod
    async def connect(cls, address: str, log_requests: bool = False, process: multiprocessing.Process | None = None,
                      timeout: float | None = None) -> "MultiprocessEngineClient":
        """Joins the engine core at address, waiting while it loads; process: the core, when this one started it
        (its exit during loading ends the wait with its exit code)."""
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        for option in (zmq.SNDHWM, zmq.RCVHWM, zmq.LINGER):
            sock.setsockopt(option, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        await sock.send(encoder.encode(Call(0, "info")))
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not await sock.poll(100):
            failure = None
            if process is not None and not process.is_alive():
                failure = RuntimeError(f"the engine core process exited with code {process.exitcode} while loading")
            elif deadline is not None and loop.time() > deadline:
                failure = TimeoutError(f"the engine core at {address} did not answer within {timeout:g} s")
            if failure is not None:
                monitor.close(linger=0)
                sock.close(linger=0)
                ctx.term()
                raise failure
        reply = from_core_decoder.decode(await sock.recv())
        info = msgspec.convert(reply.result, EngineInfo)
        client = cls(info, log_requests, ctx, sock, monitor, process)
        client.address = address
        return client

    def _wire_id(self, request_id: str) -> str:
        return f"{self._wire_prefix}{next(self._wire_ids):x}"

    def _send_add(self, req: AddRequest):
        try:
            payload = encoder.encode(req)
        except (OverflowError, TypeError, msgspec.EncodeError) as e:   # SamplingParams checks should leave none
            raise InvalidRequestError(f"the request cannot be sent to the engine: {e}") from None
        self._sock.send(payload)

    def _send_abort(self, abort: Abort):
        if self.failure is None:
            self._sock.send(encoder.encode(abort))

    async def call(self, method: str, *args):
        if self.failure is not None:
            raise EngineDeadError(f"the engine stopped: {self.failure}")
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        await self._sock.send(encoder.encode(Call(call_id, method, list(args))))
        try:
            reply: Reply = await future
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise error_from_wire(reply.error.kind, reply.error.message, reply.error.param)
        kind = _RESULT_TYPES.get(method)
        return reply.result if kind is None else msgspec.convert(reply.result, kind)

    async def _receive(self):
        try:
            while True:
                msg = from_core_decoder.decode(await self._sock.recv())
                if isinstance(msg, StepOutputs):
                    self._process(msg.outputs)
                else:
                    future = self._calls.get(msg.call_id)
                    if future is not None and not future.done():
                        future.set_result(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:   # nothing would reach this process's requests any more: fail them, stop serving
            log.exception("reading the engine socket failed")
            self._on_core_death(EngineDeadError(f"reading the engine socket failed: {e}"))

    async def _watch(self):
        """Waits for the socket to lose the core: its process ended."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                break
        code = ""
        if self.process is not None:
            await asyncio.to_thread(self.process.join, 5)
            code = f" (exit code {self.process.exitcode})"
        self._on_core_death(EngineDeadError(f"the engine core process ended{code}"))

    def _on_core_death(self, error: EngineDeadError):
        if self.failure is not None:
            return
        log.error("%s", error)
        self.failure = error
        self._fail_all(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if self.on_loop_death is not None:
            self.on_loop_death(error)

    async def shutdown(self):
        """Closes the socket; with a core of its own, stops it (SIGUSR1, then SIGKILL after 10 s)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        if self.process is not None:
            if self.process.is_alive():
                os.kill(self.process.pid, signal.SIGUSR1)   # the core ignores SIGTERM: only its starter stops it
                await asyncio.to_thread(self.process.join, 10)
            if self.process.is_alive():
                self.process.kill()
                await asyncio.to_thread(self.process.join, 5)
            shutil.rmtree(os.path.dirname(self.address.removeprefix("ipc://")), ignore_errors=True)
