"""Tensor-parallel workers: ranks 1..N-1 as processes of their own, each running its share of every forward pass.

Rank 0 is the engine core's step thread: it schedules, broadcasts each step's inputs (a StepMessage) to the
workers, runs its own share of the forward pass with them, and samples from the logits gathered on it. A
worker builds its shard of the model and of the KV cache, then runs the steps it is sent until told to stop.
A worker that dies ends the engine (TensorParallelWorkers.on_death), and a worker whose rank 0 dies is
killed with it (PR_SET_PDEATHSIG), so no process outlives the server. Workers are started as `python -m
server.tp_workers`, not multiprocessing children, since the engine core is itself a daemonic process.
"""
import ctypes
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.layers.attention import AttentionGroup, AttentionMetadata
from server.tensor_parallel import TensorParallel, connect, tcp_store

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0   # seconds a worker has to exit once told to, before it is killed


@dataclass
class WorkerSpec:
    """What a worker needs to build its shard, the same as rank 0's."""
    size: int
    model_path: str
    dtype: torch.dtype
    device: str               # rank 0's device type: cpu, or cuda (rank r then takes cuda:r)
    max_model_len: int
    quant: str
    quant_group_size: int
    kernels: str
    max_loras: int
    max_lora_rank: int
    threads: int              # torch threads per rank on the CPU
    block_size: int           # the KV cache sizing settings, from which each rank says how many blocks it can hold
    kv_cache_tokens: int | None
    kv_cache_memory_fraction: float | None
    max_batch_size: int


@dataclass
class KVCacheSpec:
    num_blocks: int           # including the padding block
    block_size: int


@dataclass
class StepMessage:
    """One forward pass, as rank 0 runs it (tensors on the CPU)."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    lora_slots: torch.Tensor | None
    logits_rows: list[torch.Tensor]       # the hidden rows of each compute_logits call rank 0 makes, in order
    lora_installs: list = field(default_factory=list)   # (slot, LoRAAdapter) to write before the forward
    clear_blocks: list[int] = field(default_factory=list)   # KV blocks to zero first (a failed row's NaN)


def _die_with_parent():
    """Linux: the kernel kills this process when the thread that started it ends (rank 0's step thread, which
    lives until the engine has stopped the workers, or the whole process dying)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _device(spec: WorkerSpec, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if spec.device == "cuda" else torch.device(spec.device)


def to_device(x, device: torch.device):
    """A StepMessage's tensors (and those in its attention metadata) on device."""
    if isinstance(x, torch.Tensor):   # to the CPU (rank 0's message) it waits: pickling reads it at once
        return x.to(device, non_blocking=device.type == "cuda")
    if isinstance(x, AttentionMetadata):
        return AttentionMetadata(to_device(x.slot_mapping, device), [to_device(g, device) for g in x.groups])
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    if isinstance(x, AttentionGroup):
        return AttentionGroup(to_device(x.tokens, device), to_device(x.block_tables, device), to_device(x.query_positions, device))
    return x


def worker_main(rank: int, spec: WorkerSpec, port: int, status):
    """A worker process: connect, load this rank's shard, report on `status` (one line: `ok BLOCKS`, the KV
    blocks this rank can hold, or the error), then run steps until rank 0 says stop."""
    logging.basicConfig(level="INFO", format=f"%(asctime)s %(levelname)s tp-rank-{rank} %(name)s: %(message)s")
    from batching.engine_model import allocate_kv_caches, kv_cache_blocks
    from batching.kv_cache import zero_blocks
    from server.loader import load_model
    from server.lora import LoRAPool
    torch.set_num_threads(spec.threads)
    device = _device(spec, rank)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp = connect(tcp_store(rank, spec.size, port), rank, spec.size, device)
        model = load_model(spec.model_path, spec.dtype, device, spec.max_model_len, spec.quant,
                           spec.quant_group_size, spec.kernels, tp)
        blocks, _ = kv_cache_blocks(model, spec.dtype, device, spec.block_size, spec.kv_cache_tokens,
                                    spec.kv_cache_memory_fraction, spec.max_batch_size, spec.max_model_len)
    except BaseException as e:
        status.write(" ".join(f"{type(e).__name__}: {e}".split()) + "\n")
        status.flush()
        sys.exit(1)
    status.write(f"ok {blocks}\n")
    status.flush()
    cache: KVCacheSpec = tp.broadcast_object()
    kv_caches = allocate_kv_caches(model, cache.num_blocks, cache.block_size, spec.dtype, device)
    pool = LoRAPool(model.lora_shards(), spec.max_loras, spec.max_lora_rank, spec.dtype, device, model.ops.add_lora)
    with torch.inference_mode():
        while (msg := tp.broadcast_object()) is not None:
            for slot, adapter in msg.lora_installs:
                pool.fill(slot, adapter)
            if msg.clear_blocks:
                zero_blocks(kv_caches, msg.clear_blocks)
            msg = StepMessage(*(to_device(getattr(msg, f), device) for f in ("input_ids", "positions", "meta",
                                                                              "lora_slots", "logits_rows")))
            pool.token_slots = msg.lora_slots
            hidden = model(msg.input_ids, msg.positions, kv_caches, msg.meta, pool if msg.lora_slots is not None else None)
            for rows in msg.logits_rows:
                model.compute_logits(hidden[rows])
    os._exit(0)   # the connections close with the process


class WorkerStartError(RuntimeError):
    pass


class TensorParallelWorkers:
    """Rank 0's side: starts the workers (python -m server.tp_workers RANK PORT, the WorkerSpec pickled on
    stdin, the status line on stdout), sends them each step, watches that they live, stops them."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.stopping = False
        self.on_death: Callable[[BaseException], None] | None = None   # set by the engine: it stops
        store = tcp_store(0, spec.size)
        self.processes: list[subprocess.Popen] = []
        try:
            for rank in range(1, spec.size):
                p = subprocess.Popen([sys.executable, "-m", "server.tp_workers", str(rank), str(store.port),
                                      str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self.processes.append(p)
                log.info("tensor-parallel rank %d started as process %d", rank, p.pid)
                try:
                    p.stdin.write(pickle.dumps(spec))
                    p.stdin.close()
                except BrokenPipeError:   # it exited before reading: the wait below reports why
                    pass
            self.tp: TensorParallel = self._while_workers_live(
                lambda: connect(store, 0, spec.size, _device(spec, 0)), "joining the process group")
        except BaseException:
            self.kill()
            raise

    def _while_workers_live(self, fn, what: str):
        """fn() on a thread of its own; a worker that exits meanwhile ends the wait with its error."""
        result, done = {}, threading.Event()

        def run():
            try:
                result["value"] = fn()
            except BaseException as e:
                result["error"] = e
            done.set()

        threading.Thread(target=run, daemon=True, name="lmserve-tp-wait").start()
        while not done.wait(0.1):
            for rank, p in enumerate(self.processes, 1):
                if p.poll() is not None:
                    raise WorkerStartError(f"tensor-parallel rank {rank} exited while {what}: {self._reason(p)}")
        if "error" in result:
            raise result["error"]
        return result["value"]

    @staticmethod
    def _reason(p: subprocess.Popen) -> str:
        p.wait()
        return p.stdout.read().decode(errors="replace").strip() or f"exit code {p.returncode}"

    def wait_loaded(self) -> int:
        """Waits until every worker has loaded its shard and returns the fewest KV blocks one of them can hold;
        raises with a worker's error otherwise. From then on a worker's death calls on_death."""
        blocks = []
        for rank, p in enumerate(self.processes, 1):
            line = b""
            while not line:
                if select.select([p.stdout], [], [], 0.1)[0]:
                    line = p.stdout.readline() or b"(no status: the worker exited)"
                elif p.poll() is not None:
                    line = self._reason(p).encode()
            status = line.decode(errors="replace").strip()
            if not status.startswith("ok "):
                raise WorkerStartError(f"tensor-parallel rank {rank} failed to load its shard: {status}")
            blocks.append(int(status.split()[1]))
        for rank, p in enumerate(self.processes, 1):
            threading.Thread(target=self._watch, args=(rank, p), daemon=True, name=f"lmserve-tp-watch-{rank}").start()
        return min(blocks)

    def send(self, obj):
        """A KVCacheSpec once, then a StepMessage per step (rank 0's step thread only)."""
        self.tp.broadcast_object(obj)

    def _watch(self, rank: int, p: subprocess.Popen):
        code = p.wait()
        if self.stopping:
            return
        error = RuntimeError(f"tensor-parallel rank {rank} died (exit code {code})")
        log.error("%s; the engine stops", error)
        if self.on_death is not None:
            self.on_death(error)

    def stop(self):
        """Tells the workers to exit (they may close their connections as soon as they hear it), then makes
        sure they have."""
        if self.stopping:
            return
        self.stopping = True
        tp = getattr(self, "tp", None)
        if tp is not None and all(p.poll() is None for p in self.processes):
            sender = threading.Thread(target=self._send_stop, args=(tp,), daemon=True, name="lmserve-tp-stop")
            sender.start()
            sender.join(STOP_TIMEOUT)
        for rank, p in enumerate(self.processes, 1):
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank %d did not exit; killing it", rank)
                p.kill()
                p.wait()
            p.stdout.close()
        if tp is not None:
            tp.shutdown()
            self.tp = None

    def kill(self):
        """Ends the workers at once (the engine failed, or never started: a step may be stuck in a collective
        with a dead rank, a worker still loading hears no stop message)."""
        self.stopping = True
        for p in self.processes:
            p.kill()
        for p in self.processes:
            p.wait()
            p.stdout.close()
        tp = getattr(self, "tp", None)
        if tp is not None:
            tp.shutdown()
            self.tp = None

    @staticmethod
    def _send_stop(tp: TensorParallel):
        try:
            tp.broadcast_object(None)
        except RuntimeError as e:   # a worker that exits at once may reset its connection first
            log.debug("stop message: %s", e)


if __name__ == "__main__":
    _die_with_parent()
    if os.getppid() != int(sys.argv[3]):   # rank 0 died before the line above took effect
        sys.exit(1)
    status_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # anything else printed goes to stderr; stdout carries the status line only
    worker_main(int(sys.argv[1]), pickle.load(sys.stdin.buffer), int(sys.argv[2]), status_out)
