"""python -m bench.versus_transformers: decode speed per weight format beside transformers' generate, in one run.

For each mode (float32, bfloat16, int8, int4) it measures lmserve's decode speed through InProcessEngineClient.generate at
batch 1 and with --batch concurrent requests (bench.decode's measure: the median inter-token gap, plus the
bandwidth floor), and transformers' greedy `generate` on the same weights at the same batch sizes (float
modes only: transformers has no int8/int4 CPU path of its own). llama.cpp decoding the model's GGUF file is
the peer a CPU user would pick; it is timed too when `llama_cpp` is importable (it is not a dependency).

    python -m bench.versus_transformers                      # the default model, every mode, batch 1 and 16
    python -m bench.versus_transformers --compile            # lmserve's batch-1 decode step compiled (CPU)
"""
import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import torch

from bench.decode import measure
from bench.kernels import copy_bandwidth
from server.config import EngineConfig
from server.engine_client import in_process_engine

MODES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("float32", "int8"),
         "int4": ("float32", "int4")}
TARGETS = [  # (what, numerator, denominator, target ratio)
    ("float32 batch 1 vs transformers", ("float32", 1), ("hf-float32", 1), 1.1),
    ("float32 batch B vs transformers' static batch", ("float32", "B"), ("hf-float32", "B"), 1.5),
    ("int8 batch 1 vs our float32", ("int8", 1), ("float32", 1), 1.5),
    ("int4 batch 1 vs our float32", ("int4", 1), ("float32", 1), 2.5),
    ("int4 batch 1 vs llama.cpp", ("int4", 1), ("llama.cpp", 1), 0.5),
]


async def lmserve_speed(model: str | None, dtype: str, quant: str, batch: int, prompt_tokens: int,
                        output_tokens: int, bandwidth: float, compile: bool = False) -> dict:
    engine = in_process_engine(EngineConfig(model=model, dtype=dtype, quant=quant, max_batch_size=batch, max_wait_ms=0,
                                      enable_prefix_caching=False, compile=compile,
                                      kv_cache_tokens=batch * (prompt_tokens + output_tokens + 64)))
    try:
        r = await measure(engine, batch, prompt_tokens, output_tokens, bandwidth=bandwidth)
    finally:
        await engine.shutdown()
    return {"tokens_per_s": r.total_tokens_per_s, "percent_of_floor": r.percent_of_floor if batch == 1 else None}


def transformers_speed(path: str, dtype: str, batch: int, prompt_tokens: int, output_tokens: int,
                       vocab_size: int) -> dict:
    """Total decode tokens/s of one static batch: (t(N new tokens) - t(1 new token)) over the N - 1 decode steps."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    rng = random.Random(0)
    ids = torch.tensor([[rng.randrange(5, vocab_size - 1) for _ in range(prompt_tokens)] for _ in range(batch)])

    def run(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start
    run(4)  # warm-up
    prefill = min(run(1) for _ in range(3))
    total = min(run(output_tokens) for _ in range(2))
    return {"tokens_per_s": batch * (output_tokens - 1) / (total - prefill), "percent_of_floor": None}


def llama_cpp_speed(gguf_file: str, prompt_tokens: int, output_tokens: int, threads: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=gguf_file, n_threads=threads, n_ctx=prompt_tokens + output_tokens + 16,
                          verbose=False)
    rng = random.Random(0)
    prompt = [rng.randrange(5, llm.n_vocab() - 1) for _ in range(prompt_tokens)]

    def run(new_tokens: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
            if i + 1 == new_tokens:
                break
        return time.perf_counter() - start
    run(4)
    prefill = min(run(1) for _ in range(2))
    return {"tokens_per_s": (output_tokens - 1) / (run(output_tokens) - prefill), "percent_of_floor": None}


async def main(args) -> dict:
    from server.default_model import default_gguf
    from server.model_source import resolve_model
    source = resolve_model(args.model)
    vocab_size = json.loads(Path(source.path, "config.json").read_text())["vocab_size"]
    bandwidth = copy_bandwidth(torch.device("cpu"), 1 << 30, graph=False)
    batches = sorted({1, args.batch})
    results: dict[tuple, dict] = {}
    for mode in args.modes.split(","):
        dtype, quant = MODES[mode]
        for b in batches:
            # --compile: a lone request's decode step is compiled; a batch of several decodes runs eagerly anyway
            results[(mode, b)] = await lmserve_speed(args.model, dtype, quant, b, args.prompt_tokens,
                                                     args.output_tokens, bandwidth, args.compile and b == 1)
            print(f"lmserve {mode:9s} batch {b:3d}: {results[(mode, b)]['tokens_per_s']:7.1f} tok/s", flush=True)
            if quant == "none" and not args.no_transformers:
                results[(f"hf-{mode}", b)] = transformers_speed(source.path, dtype, b, args.prompt_tokens,
                                                               args.output_tokens, vocab_size)
                print(f"transformers {mode:9s} batch {b:3d}: {results[(f'hf-{mode}', b)]['tokens_per_s']:7.1f} tok/s",
                      flush=True)
    gguf = args.gguf or (default_gguf() if args.model is None else None)
    if gguf:
        peer = llama_cpp_speed(str(gguf), args.prompt_tokens, args.output_tokens, torch.get_num_threads())
        if peer is not None:
            results[("llama.cpp", 1)] = peer
    print(f"lmserve's batch-1 decode step: {'compiled (--compile)' if args.compile else 'eager'}")
    print(format_table(results, args.batch, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}@{k[1]}": v for k, v in results.items()}, f, indent=2)
    return results


def format_table(results: dict, batch: int, bandwidth: float) -> str:
    lines = [f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads", "",
             "| engine / mode | batch | tok/s (all sequences) | % of bandwidth floor |", "|---|---|---|---|"]
    for (mode, b), r in results.items():
        floor = f"{r['percent_of_floor']:.0f}%" if r["percent_of_floor"] is not None else ""
        lines.append(f"| {mode} | {b} | {r['tokens_per_s']:.1f} | {floor} |")
    lines += ["", "| target | ratio | target |", "|---|---|---|"]
    for what, (a, ab), (d, db), target in TARGETS:
        key_a, key_d = (a, batch if ab == "B" else ab), (d, batch if db == "B" else db)
        if key_a in results and key_d in results:
            ratio = results[key_a]["tokens_per_s"] / results[key_d]["tokens_per_s"]
            lines.append(f"| {what.replace('batch B', f'batch {batch}')} | {ratio:.2f}x | "
                         f"{'>=' if ratio >= target else 'MISSED <'} {target}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as python -m server --model (default: the default model)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=16, help="the concurrent batch measured beside batch 1")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--gguf", default=None, help="the GGUF file llama.cpp decodes (default: the default model's)")
    p.add_argument("--no-transformers", action="store_true", help="time lmserve alone")
    p.add_argument("--compile", action="store_true", help="lmserve at batch 1 with its compiled decode step, as "
                   "python -m server --compile")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
