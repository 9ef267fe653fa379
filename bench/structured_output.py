"""python -m bench.structured_output: what grammars cost, in one run.

1. The sampler's step with half the rows constrained by a JSON schema against the same step with none, at
   batch 1, 16 and 64, on the model's real vocabulary (the matchers are advanced into the middle of an object,
   where masks are the most work: any string character is allowed).
2. `bench.load` against one server (`python -m server`), the same seeded workload twice: no request
   constrained, then half of them (`--structured-fraction 0.5`, a JSON schema that never completes within
   max_tokens, so both runs generate the same tokens). Prints the throughput ratio.

    python -m bench.structured_output --model tiny --qps 1000 --num-requests 300
"""
import argparse
import asyncio
import json
import statistics
import time

import torch

from bench.load import LoadOptions, run_load
from bench.processes import start_lmserve
from bench.workload import LOAD_SCHEMA
from server.model_source import resolve_model
from server.sampling import SamplerRow, SamplingParams, StructuredOutput, sample
from server.structured_output import GrammarCompiler
from server.tokenizer import load_tokenizer


def mask_cost(model: str | None, batches=(1, 16, 64), repeats: int = 30) -> list[dict]:
    """Median ms of sample() per step, unconstrained vs half the rows constrained."""
    tokenizer = load_tokenizer(resolve_model(model).path)
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    spec = StructuredOutput("json", json.dumps(LOAD_SCHEMA))
    template = asyncio.run(compiler.matcher(spec))
    prefix = tokenizer.encode('{"items":["alpha","be', add_special_tokens=False)
    rows = []
    for batch in batches:
        logits = torch.randn(batch, vocab)
        plain = [SamplerRow(SamplingParams(temperature=0), torch.Generator(), [1], 1, (tokenizer.eos_token_id,))
                 for _ in range(batch)]
        constrained = []
        for i, row in enumerate(plain):
            grammar = None
            if i % 2 == 0:
                grammar = template.deep_copy()
                assert grammar.consume_tokens(prefix), grammar.get_error()
            constrained.append(SamplerRow(row.params, row.generator, row.token_ids, 1, row.eos_token_ids, grammar))
        timings = {}
        for name, batch_rows in (("none", plain), ("half", constrained)):
            sample(logits, batch_rows)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                sample(logits, batch_rows)
                times.append(time.perf_counter() - start)
            timings[name] = statistics.median(times) * 1e3
        rows.append({"batch": batch, "constrained_rows": (batch + 1) // 2, "vocab": vocab,
                     "sample_ms_none": timings["none"], "sample_ms_half": timings["half"],
                     "mask_ms": timings["half"] - timings["none"]})
    compiler.shutdown()
    return rows


async def load_pair(args) -> dict:
    server = start_lmserve(*(["--model", args.model] if args.model else []), "--max-batch-size", str(args.max_batch_size))
    try:
        results = {}
        for fraction in (0.0, 0.5):
            options = LoadOptions(qps=args.qps, num_requests=args.num_requests, url=server.url, stream=True,
                                  prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed,
                                  progress=False, structured_fraction=fraction)
            summary, _ = await run_load(options)
            results[fraction] = summary["client"]
        return results
    finally:
        server.stop()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.structured_output", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="as python -m server --model (default: the default model)")
    p.add_argument("--qps", type=float, default=1000.0)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--prompt-tokens", default="16:32")
    p.add_argument("--max-tokens", default="32")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-load", action="store_true", help="the sampler figures only")
    args = p.parse_args(argv)
    print(f"{'batch':>5} {'constrained':>11} {'vocab':>6} {'step ms, none':>14} {'step ms, half':>14} {'mask ms':>8}")
    for r in mask_cost(args.model):
        print(f"{r['batch']:5} {r['constrained_rows']:11} {r['vocab']:6} {r['sample_ms_none']:14.3f} "
              f"{r['sample_ms_half']:14.3f} {r['mask_ms']:8.3f}")
    if args.skip_load:
        return
    results = asyncio.run(load_pair(args))
    none, half = results[0.0], results[0.5]
    for name, r in (("none constrained", none), ("half constrained", half)):
        print(f"bench.load, {name}: {r['output_tokens_per_s']:.1f} output tok/s, {r['achieved_rps']:.1f} req/s, "
              f"{r['failed']} failed, ITL p50 {1e3 * r['itl_s']['p50']:.1f} ms")
    print(f"throughput with half the requests constrained: {half['output_tokens_per_s'] / none['output_tokens_per_s']:.3f}"
          f"x the unconstrained run's")


if __name__ == "__main__":
    main()
