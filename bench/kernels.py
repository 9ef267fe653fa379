"""python -m bench.kernels: each Triton kernel against torch on a 7B model's shapes, next to the device's limits.

Prints, per shape: time, achieved GB/s and TFLOP/s, the torch baseline (fp16 matmul, SDPA), and how close the
kernel comes to its memory-bandwidth floor (bytes it must move / copy bandwidth measured on this device).
Needs CUDA; --smoke runs tiny shapes on any device (the Triton interpreter on CPU) to check the script itself,
and its timings mean nothing.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

# name -> (HBM TB/s, dense fp16 TFLOP/s), from the vendors' data sheets.
DATASHEET = {"H100 80GB HBM3": (3.35, 989), "H100": (3.35, 989), "H200": (4.8, 989), "A100": (2.0, 312)}
LINEAR_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]   # (K, N) of Llama-2-7B projections
M_VALUES = [1, 8, 32, 128, 512]
# paged_attention's defaults beside the choices they replaced: keys per loop step, and the context split.
ATTENTION_VARIANTS = {"default": {}, "tile 16": dict(keys_per_tile=16), "no split": dict(min_programs=1)}


def timer(fn, device, graph: bool = True) -> float:
    """Median seconds per call. On CUDA the calls replay from a CUDA graph (as a server's decode step would), so
    microsecond kernels are timed and not Python's launch overhead; graph=False for code that syncs."""
    if device.type == "cuda":
        import triton.testing
        fn()   # compile and autotune outside the capture
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3


def copy_bandwidth(device, nbytes: int, graph: bool = True) -> float:
    """Bytes per second of a device-to-device copy (read + write); graph as for timer."""
    src = torch.ones(nbytes // 2, dtype=torch.float16, device=device)   # written: never-touched pages read as free
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src), device, graph)


def datasheet(device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET.items() if k in name), None)


def bench_linear(device, shapes, m_values, bandwidth, rows):
    """Each timed call runs over enough copies of the weights to overflow the L2 cache, so weights stream
    from device memory as a real model's do (one layer's weights would otherwise sit in L2 across replays)."""
    from kernels.quant_matmul import gptq_matmul, w8a16_matmul
    from server.quantization.rtn import quantize_int8, quantize_rtn
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    for K, N in shapes:
        copies = max(1, -(-3 * l2 // (K * N // 2)))   # sized for the smallest (int4) weights
        fp16, int8, int4 = [], [], []
        for _ in range(copies):
            w = torch.randn(N, K, device=device, dtype=torch.float16) * 0.02
            fp16.append(w.t().contiguous())
            int8.append(quantize_int8(w))
            int4.append({k: v.to(device) for k, v in quantize_rtn(w, 4, 128).items()})
            del w
        for M in m_values:
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            act = 2 * (M * K + M * N)
            fp16_t = timer(lambda: [x @ w_t for w_t in fp16], device) / copies
            cases = {
                "fp16 torch.matmul": (fp16_t, 2 * K * N),
                "int8 w8a16": (timer(lambda: [w8a16_matmul(x, q, s) for q, s in int8], device) / copies, K * N + 4 * N),
                "int4 gptq g128": (timer(lambda: [gptq_matmul(x, g["qweight"], g["qzeros"], g["scales"], g["g_idx"], 4,
                                                              group_size=128) for g in int4], device) / copies,
                                   K * N // 2 + (K // 128) * N * 2.5),
            }
            for name, (t, weight_bytes) in cases.items():
                nbytes = weight_bytes + act
                rows.append(dict(op=name, shape=f"M={M} K={K} N={N}", ms=t * 1e3, gbps=nbytes / t / 1e9,
                                 tflops=2 * M * K * N / t / 1e12, vs_torch=fp16_t / t, floor=nbytes / bandwidth / t))
        del fp16, int8, int4


def paged_batch(device, batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block: int = 16):
    from server.layers.attention import AttentionGroup, AttentionMetadata
    blocks_per_seq = -(-(context + 1) // block)
    num_blocks = batch * blocks_per_seq
    perm = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq)
    cache = torch.randn(2, num_blocks, block, kv_heads, head_dim, device=device, dtype=torch.float16)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.float16)
    k = torch.randn(batch, kv_heads, head_dim, device=device, dtype=torch.float16)
    positions = torch.full((batch, 1), context, device=device)
    slots = perm[:, context // block] * block + context % block
    meta = AttentionMetadata(slots, [AttentionGroup(slice(0, batch), perm, positions)])
    return q, k, k.clone(), cache, meta


def bench_attention(device, configs, bandwidth, rows):
    from kernels.paged_attention import paged_attention
    for batch, context, heads, kv_heads in configs:
        head_dim = 128
        q, k, v, cache, meta = paged_batch(device, batch, context, heads, kv_heads, head_dim)
        # SDPA on contiguous K/V of the same length: what a non-paged server would run.
        qs = q[:, :, None]
        ks, vs = (torch.randn(batch, kv_heads, context + 1, head_dim, device=device, dtype=torch.float16) for _ in range(2))
        sdpa = timer(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=heads != kv_heads), device)
        nbytes = 2 * batch * (context + 1) * kv_heads * head_dim * 2
        for variant, options in ATTENTION_VARIANTS.items():
            t = timer(lambda: paged_attention(q, k, v, cache[0], cache[1], meta, head_dim ** -0.5, None, **options),
                      device)
            rows.append(dict(op=f"paged attention {variant}", shape=f"B={batch} ctx={context} H={heads}/{kv_heads}",
                             ms=t * 1e3, gbps=nbytes / t / 1e9,
                             tflops=4 * batch * heads * (context + 1) * head_dim / t / 1e12, vs_torch=sdpa / t,
                             floor=nbytes / bandwidth / t))


def bench_elementwise(device, tokens_list, hidden, bandwidth, rows):
    from kernels.rms_norm import rms_norm, rms_norm_reference
    from kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference
    for T in tokens_list:
        x, r = (torch.randn(T, hidden, device=device, dtype=torch.float16) for _ in range(2))
        w = torch.ones(hidden, device=device, dtype=torch.float16)
        g, u = (torch.randn(T, hidden * 11008 // 4096, device=device, dtype=torch.float16) for _ in range(2))
        for name, fn, ref, nbytes in [
                ("rms_norm + residual", lambda: rms_norm(x, w, 1e-6, r), lambda: rms_norm_reference(x, w, 1e-6, r),
                 4 * x.numel() * 2),
                ("silu_and_mul", lambda: silu_and_mul(g, u), lambda: silu_and_mul_reference(g, u), 3 * g.numel() * 2)]:
            t, t_ref = timer(fn, device), timer(ref, device)
            rows.append(dict(op=name, shape=f"T={T}", ms=t * 1e3, gbps=nbytes / t / 1e9, tflops=0.0,
                             vs_torch=t_ref / t, floor=nbytes / bandwidth / t))


def bench_lora(device, hidden, t_values, ranks, bandwidth, rows, num_adapters: int = 4):
    """A q_proj-sized LoRA delta for a batch whose tokens spread over num_adapters adapters, against the torch path
    (one pair of matmuls per adapter) and next to the base fp16 projection it rides on."""
    from kernels.lora import add_lora, add_lora_reference
    K = N = hidden
    w_t = torch.randn(K, N, device=device, dtype=torch.float16) * 0.02
    for rank in ranks:
        a = torch.randn(num_adapters, rank, K, device=device, dtype=torch.float16) * 0.02
        b = torch.randn(num_adapters, N, rank, device=device, dtype=torch.float16) * 0.02
        ranks_t = torch.full((num_adapters,), rank, dtype=torch.int32, device=device)
        for T in t_values:
            x = torch.randn(T, K, device=device, dtype=torch.float16)
            y = torch.randn(T, N, device=device, dtype=torch.float16)
            slots = torch.arange(T, device=device, dtype=torch.int32) % num_adapters
            base = timer(lambda: x @ w_t, device)
            t = timer(lambda: add_lora(y, x, a, b, ranks_t, slots), device)
            t_ref = timer(lambda: add_lora_reference(y, x, a, b, ranks_t, slots), device, graph=False)
            used = min(T, num_adapters)
            nbytes = used * rank * (K + N) * 2 + T * (K + 2 * N) * 2
            rows.append(dict(op=f"lora r={rank} x{used} adapters", shape=f"T={T} K={K} N={N}", ms=t * 1e3,
                             gbps=nbytes / t / 1e9, tflops=2 * T * rank * (K + N) / t / 1e12, vs_torch=t_ref / t,
                             floor=nbytes / bandwidth / t, over_base=t / base))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device, to check the script (no real timings)")
    p.add_argument("--only", choices=["linear", "attention", "elementwise", "lora"], default=None)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--m", default=None, help="comma-separated M values for the matmuls (default 1,8,32,128,512)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench.kernels times GPU kernels and needs CUDA; --smoke checks the script on CPU")
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    if args.smoke:
        shapes, m_values, attn, tokens, hidden = [(256, 128)], [1, 16], [(2, 40, 4, 2)], [4], 128
        lora_t, lora_ranks = [1, 6], [8]
    else:
        shapes, m_values, hidden, tokens = LINEAR_SHAPES, M_VALUES, 4096, [1, 64, 512, 4096]
        attn = [(b, ctx, h, kv) for h, kv in [(32, 32), (32, 8)] for b, ctx in [(1, 4096), (16, 1024), (64, 1024), (64, 4096)]]
        lora_t, lora_ranks = [1, 8, 32, 128, 512], [16, 64]
    if args.m:
        m_values = [int(v) for v in args.m.split(",")]
    # Timed plainly: a copy replayed from a CUDA graph reads well under the device's real copy bandwidth.
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24, graph=False)
    sheet = datasheet(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s"
          + (f"; data sheet {sheet[0] * 1e3:.0f} GB/s, {sheet[1]} dense fp16 TFLOP/s" if sheet else ""))
    rows = []
    if args.only in (None, "linear"):
        bench_linear(device, shapes, m_values, bandwidth, rows)
    if args.only in (None, "attention"):
        bench_attention(device, attn, bandwidth, rows)
    if args.only in (None, "elementwise"):
        bench_elementwise(device, tokens, hidden, bandwidth, rows)
    if args.only in (None, "lora"):
        bench_lora(device, hidden, lora_t, lora_ranks, bandwidth, rows)
    print(f"{'op':24} {'shape':28} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'x torch':>8} {'% floor':>8}")
    for r in rows:
        print(f"{r['op']:24} {r['shape']:28} {r['ms']:9.4f} {r['gbps']:8.0f} {r['tflops']:8.1f} "
              f"{r['vs_torch']:8.2f} {100 * r['floor']:7.0f}%" + (f"  +base {r['over_base']:.2f}" if "over_base" in r else ""))
    print("x torch: torch's time over ours (fp16 torch.matmul for the matmuls, SDPA on contiguous K/V for attention, "
          "the torch reference for elementwise ops and LoRA); % floor: bytes moved / measured copy bandwidth over our "
          "time. LoRA rows also give their time over the fp16 base projection's (+base).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
