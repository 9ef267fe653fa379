"""python -m bench.engine_throughput: offline engine throughput, all requests at once vs one at a time.

Measures the engine alone (no HTTP): N requests of --prompt-tokens random tokens, each generating
--output-tokens with ignore_eos, on the embedded default model unless --model is given.
"""
import argparse
import asyncio
import random
import time

from server.config import EngineConfig
from server.engine_client import InProcessEngineClient, in_process_engine
from server.sampling import SamplingParams


async def run_batch(engine: InProcessEngineClient, prompts, params) -> float:
    async def one(p):
        async for _ in engine.generate(p, params):
            pass
    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start


async def run_sequential(engine: InProcessEngineClient, prompts, params) -> float:
    start = time.perf_counter()
    for p in prompts:
        async for _ in engine.generate(p, params):
            pass
    return time.perf_counter() - start


async def main(args):
    engine = in_process_engine(EngineConfig(model=args.model, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                      kv_cache_tokens=args.kv_cache_tokens, enable_prefix_caching=False,
                                      quant=args.quant, dtype=args.dtype))
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    prompts = [[rng.randrange(5, vocab - 64) for _ in range(args.prompt_tokens)] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_tokens, ignore_eos=True)
    await run_batch(engine, prompts[:4], params)  # warm-up
    out_tokens = args.num_requests * args.output_tokens
    print(f"model={engine.model_path} device={engine.core.device} dtype={engine.core.dtype} quant={args.quant} kernels={engine.core.model.ops.name} "
          f"requests={args.num_requests} prompt={args.prompt_tokens} output={args.output_tokens}")
    steps0 = engine.core.num_steps
    batched = await run_batch(engine, prompts, params)
    steps = engine.core.num_steps - steps0
    print(f"batched     : {batched:7.2f} s  {out_tokens / batched:9.1f} output tok/s  "
          f"{args.num_requests / batched:7.1f} req/s  {steps} steps ({batched / steps * 1000:.2f} ms/step)")
    n_seq = max(1, args.num_requests // args.sequential_fraction)
    sequential = await run_sequential(engine, prompts[:n_seq], params)
    seq_rate = n_seq * args.output_tokens / sequential
    print(f"one at a time: {sequential:7.2f} s  {seq_rate:9.1f} output tok/s  ({n_seq} requests)")
    print(f"speed-up    : {out_tokens / batched / seq_rate:.1f}x")
    await engine.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as python -m server --model (default: the default model)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sequential-fraction", type=int, default=8, help="run 1/N of the requests one at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="none", help="as python -m server --quant")
    p.add_argument("--dtype", default="auto", help="as python -m server --dtype")
    asyncio.run(main(p.parse_args()))
