"""python -m bench.serving_efficiency: output tok/s served over streaming HTTP at saturation, over the engine alone.

One seeded workload (--num-requests requests offered at --qps, far above capacity) runs, in one invocation:
  1. straight into an in-process engine: no HTTP, no tokenizing (the engine alone);
  2. over streaming HTTP through bench.load, against python -m server --engine-in-process (HTTP, detokenizing
     and the step loop in one process: the layout before the engine core had a process of its own);
  3. the same against python -m server (the engine core in its own process), once per --api-server-count.
It prints each one's output tok/s and its share of the engine alone's.

  python -m bench.serving_efficiency --model tiny --max-batch-size 256 --api-server-counts 1,2
"""
import argparse
import asyncio
import time

from bench.clients import VOCABULARY_TEXT
from bench.load import LoadOptions, run_load
from bench.processes import start_lmserve
from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.sampling import SamplingParams


async def engine_alone(args, options: LoadOptions) -> float:
    engine = in_process_engine(EngineConfig(model=args.model, max_batch_size=args.max_batch_size,
                                            enable_prefix_caching=False))
    vocabulary = sorted(set(await engine.tokenize(VOCABULARY_TEXT, add_special_tokens=False)))
    plan = options.workload([engine.model_name]).plan(vocabulary)

    async def one(p) -> int:
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
        return sum([len(out.token_ids) async for out in engine.generate(p.prompt_token_ids, params)])
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in plan)))
    took = time.perf_counter() - start
    await engine.shutdown()
    return tokens / took


def served(args, options: LoadOptions, *flags: str) -> dict:
    server = start_lmserve("--model", args.model, "--max-batch-size", str(args.max_batch_size), "--log-level",
                           "warning", "--no-prefix-caching", *flags)
    try:
        options.url = server.url
        report, _ = asyncio.run(run_load(options))
    finally:
        server.stop()
    return report["client"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serving_efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--qps", type=float, default=1000.0, help="offered rate; far above capacity measures saturation")
    p.add_argument("--prompt-tokens", default="8:24")
    p.add_argument("--max-tokens", default="16:32")
    p.add_argument("--api-server-counts", default="1", help="comma-separated --api-server-count values to serve with")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    options = LoadOptions(qps=args.qps, num_requests=args.num_requests, stream=True, prompt_tokens=args.prompt_tokens,
                          max_tokens=args.max_tokens, seed=args.seed, progress=False)
    alone = asyncio.run(engine_alone(args, options))
    print(f"engine alone (in-process, no HTTP)        {alone:8.0f} output tok/s")
    runs = [("HTTP, --engine-in-process", ["--engine-in-process"])]
    runs += [(f"HTTP, engine core process, {n} API", ["--api-server-count", n]) for n in args.api_server_counts.split(",")]
    for name, flags in runs:
        client = served(args, options, *flags)
        rate = client["output_tokens_per_s"]
        print(f"{name:<41} {rate:8.0f} output tok/s  {rate / alone:6.1%} of the engine alone  "
              f"({client['completed']} completed, {client['failed']} failed, TTFT p99 {client['ttft_s']['p99']:.2f} s)")


if __name__ == "__main__":
    main()
