"""The engine core process: an EngineCore on an event loop of its own, behind a ZeroMQ ROUTER socket.

Every API process connects a DEALER socket and sends batching/messages.py messages; the core answers each
API process's requests with one StepOutputs per step and each Call with a Reply. A message that does not
decode to those types is logged and dropped. The process dies with its parent (PR_SET_PDEATHSIG), exits 1
when its step loop dies, and exits 0 on SIGUSR1 (sent by the API process that started it, once every API process
has drained) after aborting what is left. SIGTERM and SIGINT are ignored: a stop signal sent to the whole
process group must not end the core before the API processes have drained.
"""
import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys

import msgspec
import torch
import zmq
import zmq.asyncio

from batching.messages import (Abort, AddRequest, Call, CoreOutput, ErrorInfo, Reply, StepOutputs, encoder,
                               to_core_decoder)
from server.config import EngineConfig
from server.errors import error_to_wire, status_of
from server.sampling import InvalidRequestError
from batching.sequence import FinishReason
from server.tp_workers import WorkerStartError

log = logging.getLogger("lmserve.engine_core")
MAX_MESSAGE_BYTES = 64 * 2**20
_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """Linux: this process gets SIGKILL when the process that started it exits, however that one ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: the parent's exit handlers stop it instead
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:   # it died while this process was starting
        os._exit(1)


def run_engine_core(config: EngineConfig, address: str, log_level: str = "info", api_processes: int = 1):
    """The process's entry point (multiprocessing, spawn). On a CPU device the model's torch threads take every core
    but one for each API process past the first: the first mostly waits on its sockets and shares a core well,
    while more API processes under load would take turns with the step's threads on every core."""
    from batching.core import resolve_device
    die_with_parent()
    if resolve_device(config.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - (api_processes - 1)))
    for sig in (signal.SIGINT, signal.SIGTERM):   # the API process that started this one says when to stop
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(0.001)
    run_event_loop(_serve(config, address))


def run_event_loop(coro):
    """coro on uvloop where it is installed, else asyncio's own loop."""
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


async def _serve(config: EngineConfig, address: str):
    from batching.core import EngineCore
    try:
        core = EngineCore(config)
    except (ValueError, OSError, WorkerStartError) as e:   # a bad checkpoint, quantization or kernel choice, a
        # tensor-parallel worker that could not start: say what, exit 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    for option in (zmq.SNDHWM, zmq.RCVHWM, zmq.LINGER):
        sock.setsockopt(option, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)   # a bigger message drops its connection, unread
    sock.bind(address)
    server = CoreServer(core, sock)
    stop = asyncio.get_running_loop().create_future()
    core.on_loop_death = lambda exc: stop.done() or stop.set_result(1)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: stop.done() or stop.set_result(0))
    log.info("engine core ready on %s", address)
    receiving = asyncio.get_running_loop().create_task(server.receive())
    receiving.add_done_callback(lambda task: task.cancelled() or stop.done() or stop.set_result(1))
    code = await stop
    receiving.cancel()
    await core.shutdown()
    ctx.destroy(linger=500)   # the last outputs (requests ended by the stop) still reach their API processes
    logging.shutdown()
    os._exit(code)   # nothing is left to save; tearing down torch's interpreter state would take seconds


class CoreServer:
    """Routes messages between the socket and the core: requests in, each step's outputs to their API process."""

    def __init__(self, core, sock):
        self.core = core
        self.sock = sock
        self.owner: dict[str, bytes] = {}    # request id -> the identity of the API process that sent it
        core.sink = self.send_outputs

    async def receive(self):
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:   # an API process sends one frame per message; the ROUTER adds the identity
                log.warning("refused a message of %d frames on the engine socket", len(frames) - 1)
                continue
            identity, payload = frames
            try:
                self.handle(identity, payload)
            except Exception:   # one bad message must not stop the core from hearing the next
                log.exception("a message on the engine socket (%d bytes) failed", len(payload))

    def handle(self, identity: bytes, payload: bytes):
        try:
            msg = to_core_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            log.warning("refused a message on the engine socket (%d bytes): %s", len(payload), e)
            request_id = _request_id_of(payload)
            if request_id is not None and request_id not in self.owner:   # its sender is told, not left waiting
                error = ErrorInfo("InvalidRequestError", f"the engine refused the request: {e}")
                self._send(identity, [CoreOutput(request_id, [], error=error)])
            return
        if isinstance(msg, AddRequest):
            self.add(identity, msg)
        elif isinstance(msg, Abort):
            reason = FinishReason.STOP if msg.reason == "stop" else FinishReason.ABORT
            for request_id in msg.request_ids:
                if self.owner.get(request_id) == identity:
                    del self.owner[request_id]
                    self.core.abort(request_id, reason)
        else:
            asyncio.get_running_loop().create_task(self.answer(identity, msg))

    def add(self, identity: bytes, req: AddRequest):
        try:
            if req.request_id in self.owner:
                raise InvalidRequestError(f"request_id {req.request_id!r} is already in use", "request_id")
            self.owner[req.request_id] = identity
            self.core.add_request(req)
        except Exception as e:
            if self.owner.get(req.request_id) == identity and req.request_id not in self.core._seqs:
                del self.owner[req.request_id]
            if status_of(e) is None:
                log.exception("adding request %s failed", req.request_id)
            self._send(identity, [CoreOutput(req.request_id, [], error=ErrorInfo(*error_to_wire(e)))])

    async def answer(self, identity: bytes, call: Call):
        reply = Reply(call.call_id)
        try:
            reply.result = await self.core.call(call.method, *call.args)
        except Exception as e:
            if status_of(e) is None and not isinstance(e, (TypeError, ValueError)):
                log.exception("engine call %s failed", call.method)
            reply.error = ErrorInfo(*error_to_wire(e))
        await self.sock.send_multipart([identity, encoder.encode(reply)])

    def send_outputs(self, outputs: list[CoreOutput]):
        by_owner: dict[bytes, list[CoreOutput]] = {}
        for out in outputs:
            ended = out.finish_reason is not None or out.error is not None
            identity = self.owner.pop(out.request_id, None) if ended else self.owner.get(out.request_id)
            if identity is not None:
                by_owner.setdefault(identity, []).append(out)
        for identity, outs in by_owner.items():
            self._send(identity, outs)

    def _send(self, identity: bytes, outputs: list[CoreOutput]):
        self.sock.send_multipart([identity, encoder.encode(StepOutputs(outputs))])


def _request_id_of(payload: bytes) -> str | None:
    """The request id of an AddRequest that did not decode to its type (msgpack into plain values only)."""
    try:
        msg = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(msg, dict) and msg.get("type") == "add" and isinstance(msg.get("request_id"), str):
        return msg["request_id"]
    return None
