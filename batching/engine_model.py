"""What an engine computes with, built once on its step thread: the model (under tensor parallelism rank 0's
share of it, with worker processes holding the rest), the paged KV cache sized for every rank, the LoRA pool,
and the model runner (replaying CUDA graphs where they serve)."""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from batching.kv_cache import kv_cache_bytes_per_token, size_kv_cache
from server.compiled_decode import build_compiled_decode
from server.config import EngineConfig
from server.cuda_graphs import build_decode_graphs
from server.loader import load_hf_config, load_model
from server.lora import LoRAPool
from server.model_runner import ModelRunner
from server.models.llama import LlamaForCausalLM, check_tensor_parallel
from server.models.model_config import ModelConfig
from server.tensor_parallel import SINGLE
from server.tp_workers import KVCacheSpec, TensorParallelWorkers, WorkerSpec

log = logging.getLogger("batching.core")


@dataclass
class EngineModel:
    model: LlamaForCausalLM
    runner: ModelRunner
    lora_pool: LoRAPool
    num_blocks: int                            # KV blocks the BlockManager hands out (the cache has one more)
    tp_workers: TensorParallelWorkers | None   # ranks 1..N-1 under tensor parallelism


def build_engine_model(config: EngineConfig, model_path: Path, device: torch.device, dtype: torch.dtype,
                       max_model_len: int, eos_token_ids: tuple[int, ...],
                       on_worker_death: Callable[[BaseException], None]) -> EngineModel:
    workers = None
    try:
        if config.tensor_parallel_size > 1:
            workers = _start_workers(config, model_path, device, dtype, max_model_len)
            workers.on_death = on_worker_death
        model = load_model(model_path, dtype, device, max_model_len, config.quant, config.quant_group_size,
                           config.kernels, workers.tp if workers is not None else SINGLE,
                           int8_lm_head=config.compile and workers is None)
        worker_blocks = workers.wait_loaded() if workers is not None else None
        if model.ops.name == "triton" and (config.block_size < 16 or config.block_size & (config.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16 with the Triton kernels; got {config.block_size}")
        num_blocks, per_token = kv_cache_blocks(model, dtype, device, config.block_size, config.kv_cache_tokens,
                                                config.kv_cache_memory_fraction, config.max_batch_size, max_model_len)
        if worker_blocks is not None:   # every rank holds the same blocks: as many as the tightest one can
            num_blocks = min(num_blocks, worker_blocks)
        # One block more than the BlockManager hands out: block tables are padded with it (ModelRunner), so
        # padding never reads a block another sequence writes (whose NaN would spread through 0 * NaN).
        kv_caches = allocate_kv_caches(model, num_blocks + 1, config.block_size, dtype, device)
        if workers is not None:
            workers.send(KVCacheSpec(num_blocks + 1, config.block_size))
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.block_size,
                 per_token * num_blocks * config.block_size / 2**20)
        lora_pool = LoRAPool(model.lora_shards(), config.max_loras, config.max_lora_rank, dtype, device,
                             model.ops.add_lora)
        runner = ModelRunner(model, kv_caches, config.block_size, device, eos_token_ids, lora_pool, workers)
        # bitsandbytes is left out: LLM.int8 picks its outlier columns per call (shapes that depend on the data),
        # and NF4 has not been tried in a graph. Under tensor parallelism every rank would have to replay its
        # graph in lock step: eager for now.
        bnb = config.quant in ("bnb-int8", "nf4")
        if (device.type == "cuda" and model.ops.name == "triton" and not bnb and not config.enforce_eager
                and workers is None):
            runner.decode_graphs = build_decode_graphs(model, kv_caches, config.max_batch_size, max_model_len,
                                                       config.block_size, runner.pad_block)
        if config.compile and device.type == "cpu" and model.ops.name == "torch" and not bnb and workers is None:
            runner.compiled_decode = build_compiled_decode(model, kv_caches, config.block_size, runner.pad_block)
        elif config.compile:
            log.warning("--compile serves CPU devices with the torch ops, without tensor parallelism or "
                        "bitsandbytes; decoding eagerly")
        return EngineModel(model, runner, lora_pool, num_blocks, workers)
    except BaseException:
        if workers is not None:   # they may still be loading: not listening for a stop message
            workers.kill()
        raise


def kv_cache_blocks(model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device, block_size: int,
                    kv_cache_tokens: int | None, memory_fraction: float | None, max_batch_size: int,
                    max_model_len: int) -> tuple[int, int]:
    """(KV blocks this process can hold for the model's key/value heads, its bytes per token); a
    tensor-parallel worker says the same of its own share."""
    mc = model.config
    per_token = kv_cache_bytes_per_token(mc.num_layers, model.num_kv_heads, mc.head_dim, dtype)
    return size_kv_cache(per_token, block_size, device, kv_cache_tokens, memory_fraction,
                         max_batch_size * max_model_len, min_tokens=max_model_len), per_token


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """Per layer: [2, num_blocks, block_size, this rank's key/value heads, head_dim], zeroed."""
    mc = model.config
    return [torch.zeros(2, num_blocks, block_size, model.num_kv_heads, mc.head_dim, dtype=dtype, device=device)
            for _ in range(mc.num_layers)]


def _start_workers(config: EngineConfig, model_path: Path, device: torch.device, dtype: torch.dtype,
                   max_model_len: int) -> TensorParallelWorkers:
    size = config.tensor_parallel_size
    check_tensor_parallel(ModelConfig.from_hf(load_hf_config(model_path)), size)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError("with tensor parallelism rank r runs on cuda:r; pick the GPUs with CUDA_VISIBLE_DEVICES")
    threads = max(1, torch.get_num_threads() // size)
    if device.type == "cpu":   # the ranks share the cores
        torch.set_num_threads(threads)
    return TensorParallelWorkers(WorkerSpec(
        size, str(model_path), dtype, device.type, max_model_len, config.quant, config.quant_group_size,
        config.kernels, config.max_loras, config.max_lora_rank, threads, config.block_size, config.kv_cache_tokens,
        config.kv_cache_memory_fraction, config.max_batch_size))
