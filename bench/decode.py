"""python -m bench.decode: decode speed against the memory-bandwidth floor.

A decode step must read every weight the forward pass uses (all but the embedding table, of which it reads
one row per token) and the KV cache of each sequence, so at batch 1 tokens/s can be at most the device's
memory bandwidth over those bytes. This measures that bandwidth (a large device-to-device copy: bytes read
plus bytes written over the time), the bytes a step reads, and the tokens/s the engine reaches, request by
request through `InProcessEngineClient.generate` as a client sees them (Python and launch overhead included), and
prints the ratio. --peer transformers also times transformers' greedy `generate` on the same weights and shapes
(its static cache, which makes generate compile the decode step with torch.compile on CUDA: gpt-fast's recipe):

    python -m bench.decode --model random:llama-2-7b --dtype float16 --quant int4 --batch 1

With --tensor-parallel-size N the bytes are rank 0's share (each rank reads its own shard at the same time, from
its own GPU's memory); on the CPU the ranks share one memory bus, so the floor there is N times too high.
"""
import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bench.kernels import copy_bandwidth
from server.config import EngineConfig
from server.engine_client import InProcessEngineClient, in_process_engine
from server.sampling import SamplingParams
from server.synthetic_model import is_synthetic


@dataclass
class DecodeReport:
    model: str
    device: str
    dtype: str
    quant: str
    kernels: str
    cuda_graphs: bool              # decode steps replayed CUDA graphs (off with --enforce-eager, and on CPU)
    compiled: bool                 # a lone request's decode steps ran the compiled graph (--compile, CPU)
    tensor_parallel_size: int
    batch: int
    context_tokens: int            # prompt + generated, at the end
    weight_bytes: int              # every weight the model holds
    bytes_per_step: int            # what one decode step must read (per rank): weights but the embedding table, plus KV
    copy_gb_per_s: float           # measured device copy bandwidth (read + written)
    floor_tokens_per_s: float      # per sequence: copy bandwidth / bytes_per_step
    tokens_per_s: float            # per sequence: 1 / median inter-token time
    total_tokens_per_s: float      # all sequences together
    inter_token_ms_p50: float
    inter_token_ms_p90: float

    @property
    def percent_of_floor(self) -> float:
        return 100 * self.tokens_per_s / self.floor_tokens_per_s


def bytes_per_step(engine: InProcessEngineClient, context_tokens: int, batch: int) -> int:
    """Weights a decode step reads (the embedding table only by rows, so not counted unless tied to lm_head; an
    lm_head rounded to int8 as its codes where the compiled step serves the batch), plus the K and V of every
    layer over the context, per sequence: rank 0's share under tensor parallelism."""
    model = engine.core.model
    embedding = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embedding
    weights = model.weight_bytes - (0 if tied else embedding.numel() * embedding.element_size())
    rows = model.lm_head.int8_rows
    if rows is not None:   # weight_bytes counts both forms; a step reads one
        lm_head = model.lm_head.weight
        compiled = batch == 1 and engine.core.runner.compiled_decode is not None
        weights -= (lm_head.numel() * lm_head.element_size() if compiled
                    else rows.codes.numel() + rows.scales.numel() * rows.scales.element_size())
    cfg = model.config
    kv = 2 * cfg.num_layers * model.num_kv_heads * cfg.head_dim * engine.core.dtype.itemsize
    return weights + batch * context_tokens * kv


async def _decode(engine: InProcessEngineClient, prompt: list[int], max_tokens: int) -> list[float]:
    """Gaps between a request's consecutive tokens, in seconds."""
    times = []
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)):
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


async def measure(engine: InProcessEngineClient, batch: int, prompt_tokens: int, output_tokens: int, seed: int = 0,
                  bandwidth: float | None = None) -> DecodeReport:
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, engine.vocab_size - 1) for _ in range(prompt_tokens)] for _ in range(batch)]
    await asyncio.gather(*(_decode(engine, p, 4) for p in prompts))  # warm-up: kernels compiled and tuned
    gaps = [g for run in await asyncio.gather(*(_decode(engine, p, output_tokens) for p in prompts)) for g in run]
    p50 = statistics.median(gaps)
    context = prompt_tokens + output_tokens
    step_bytes = bytes_per_step(engine, context, batch)
    bandwidth = bandwidth or copy_bandwidth(engine.core.device, 1 << 30, graph=False)
    return DecodeReport(
        model=str(engine.model_path), device=str(engine.core.device), dtype=str(engine.core.dtype).removeprefix("torch."),
        quant=engine.core.config.quant, kernels=engine.core.model.ops.name,
        cuda_graphs=engine.core.runner.decode_graphs is not None,
        compiled=engine.core.runner.compiled_decode is not None,
        tensor_parallel_size=engine.core.config.tensor_parallel_size, batch=batch, context_tokens=context,
        weight_bytes=engine.core.model.weight_bytes, bytes_per_step=step_bytes, copy_gb_per_s=bandwidth / 1e9,
        floor_tokens_per_s=bandwidth / step_bytes, tokens_per_s=1 / p50, total_tokens_per_s=batch / p50,
        inter_token_ms_p50=1000 * p50, inter_token_ms_p90=1000 * statistics.quantiles(gaps, n=10)[-1])


def transformers_tokens_per_s(model: str, dtype: torch.dtype, device: torch.device, batch: int, prompt_tokens: int,
                             output_tokens: int, vocab_size: int) -> float:
    """Per-sequence decode tokens/s of transformers' greedy generate with a static cache, timed as
    (t(N new tokens) - t(1 new token)) / (N - 1), so the prefill is not counted; best of two runs each."""
    from transformers import AutoModelForCausalLM

    from server.synthetic_model import hf_model_for
    if is_synthetic(model):
        hf = hf_model_for(model, dtype, device)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
    hf.eval()
    ids = torch.randint(5, vocab_size - 1, (batch, prompt_tokens), device=device, generator=torch.Generator().manual_seed(0)
                        if device.type == "cpu" else None)

    def run(new_tokens: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=0, cache_implementation="static")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(output_tokens), run(1)   # warm-up: compiles the decode step
    many, one = min(run(output_tokens) for _ in range(2)), min(run(1) for _ in range(2))
    return (output_tokens - 1) / (many - one)


def format_report(r: DecodeReport) -> str:
    return "\n".join([
        f"model {r.model}  device {r.device}  dtype {r.dtype}  quant {r.quant}  kernels {r.kernels}  "
        f"cuda graphs {'on' if r.cuda_graphs else 'off'}  compiled {'on' if r.compiled else 'off'}  "
        f"tensor-parallel size {r.tensor_parallel_size}",
        f"batch {r.batch}  context {r.context_tokens} tokens  weights {r.weight_bytes / 2**30:.3f} GiB  "
        f"read per step {r.bytes_per_step / 2**30:.3f} GiB",
        f"copy bandwidth {r.copy_gb_per_s:.1f} GB/s  ->  floor {r.floor_tokens_per_s:.1f} tok/s per sequence",
        f"measured {r.tokens_per_s:.1f} tok/s per sequence ({r.total_tokens_per_s:.1f} in all), "
        f"inter-token p50 {r.inter_token_ms_p50:.2f} ms p90 {r.inter_token_ms_p90:.2f} ms",
        f"{r.percent_of_floor:.0f}% of the bandwidth floor",
    ])


async def main(args) -> DecodeReport:
    engine = in_process_engine(EngineConfig(model=args.model, quant=args.quant, dtype=args.dtype, quant_group_size=args.group_size,
                                      max_batch_size=max(args.batch, 1), max_wait_ms=0, enable_prefix_caching=False,
                                      enforce_eager=args.enforce_eager, compile=args.compile, tensor_parallel_size=args.tensor_parallel_size,
                                      kv_cache_tokens=args.batch * (args.prompt_tokens + args.output_tokens + 64),
                                      max_model_len=args.prompt_tokens + args.output_tokens + 16))
    try:
        report = await measure(engine, args.batch, args.prompt_tokens, args.output_tokens, args.seed)
    finally:
        await engine.shutdown()
    print(format_report(report))
    extra = {"percent_of_floor": report.percent_of_floor}
    if args.peer == "transformers":
        peer = transformers_tokens_per_s(args.model if is_synthetic(args.model) else str(engine.model_path), engine.core.dtype, engine.core.device, args.batch,
                                         args.prompt_tokens, args.output_tokens, engine.vocab_size)
        extra |= {"transformers_tokens_per_s": peer}
        print(f"transformers generate (static cache): {peer:.1f} tok/s per sequence; lmserve / transformers "
              f"{report.tokens_per_s / peer:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report) | extra, f, indent=2)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as python -m server --model (default: the default model)")
    p.add_argument("--quant", default="none", help="as python -m server --quant")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="auto", help="as python -m server --dtype")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, as python -m server --enforce-eager")
    p.add_argument("--compile", action="store_true", help="CPU: the compiled decode step, as python -m server --compile")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="as python -m server --tensor-parallel-size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", choices=["transformers"], default=None, help="also time this peer on the same weights")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
