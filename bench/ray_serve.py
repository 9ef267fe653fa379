"""python -m bench.ray_serve: bench.load against lmserve on Ray Serve at one offered load, with 1 engine replica
and with N (prefix-aware routing, and Ray's default router for comparison), on a shared-prefix workload.

Each configuration starts a local Ray cluster with all of this machine's CPUs (or GPUs: one per replica), runs
the same seeded bench.load workload (prompts that start with one of --prefix-groups shared prefixes), and reads
every replica's own /metrics (each asked for by name, x-lmserve-replica) for its prefix-cache hit ratio. It
prints throughput, its ratio to one replica's, and the hit ratios:

    python -m bench.ray_serve --model tiny --replicas 2 --qps 20 --duration 30 --shared-prefix-tokens 96 --prefix-groups 8
"""
import argparse
import asyncio
import os
import tempfile
import time

import httpx

from bench.load import LoadOptions, run_load
from bench.processes import free_port
from bench.report import parse_metrics
from server.config import EngineConfig, ServerConfig

HEADER = "x-lmserve-replica"


def replica_names(url: str, count: int, timeout: float = 60.0) -> set[str]:
    """The replicas' names, learnt from /health answers, which Ray spreads over the replicas (a stale queue length
    may send a run of them to one, so it asks until it has heard from count, or timeout passes)."""
    names: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(names) < count and time.monotonic() < deadline:
        names.add(httpx.get(url + "/health", timeout=30).headers[HEADER])
        time.sleep(0.05)
    return names


def replica_metrics(url: str, count: int) -> dict[str, dict]:
    """Each replica's /metrics, by name."""
    return {n: parse_metrics(httpx.get(url + "/metrics", headers={HEADER: n}, timeout=30).text)
            for n in sorted(replica_names(url, count))}


def run_config(label: str, engine: EngineConfig, replicas, load: LoadOptions) -> dict:
    import ray
    from ray import serve

    from server.ray_serve.app import application
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="lmray"),
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(engine, ServerConfig(), replicas), name="lmserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        load.url, load.metrics_url = url, None
        report, _ = asyncio.run(run_load(load))
        per_replica = replica_metrics(url, replicas.num_replicas)
    finally:
        serve.shutdown()
        ray.shutdown()
    c = report["client"]
    finished = {n: sum(v for k, v in m.items() if k[0] == "lmserve_requests_finished_total") for n, m in per_replica.items()}
    hits = {n: m.get(("lmserve_prefix_cache_hit_ratio", ()), 0.0) for n, m in per_replica.items()}
    total = sum(finished.values()) or 1
    return {"config": label, "achieved_rps": c["achieved_rps"], "output_tokens_per_s": c["output_tokens_per_s"],
            "failed": c["failed"], "ttft_p50": c["ttft_s"].get("p50"), "e2e_p50": c["e2e_s"].get("p50"),
            "finished_per_replica": finished, "prefix_hit_ratio_per_replica": hits,
            "prefix_hit_ratio": sum(hits[n] * finished[n] for n in hits) / total}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ray_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--qps", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--prompt-tokens", default="16:48", help="after the shared prefix")
    p.add_argument("--max-tokens", default="16:32")
    p.add_argument("--shared-prefix-tokens", type=int, default=96)
    p.add_argument("--prefix-groups", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="each replica's KV cache (default: the "
                   "server's); smaller than the prefixes together, it shows where a prefix is kept")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from server.ray_serve.app import ReplicaOptions
    import torch
    gpu = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    engine = EngineConfig(model=a.model, max_batch_size=a.max_batch_size, kv_cache_tokens=a.kv_cache_tokens)
    configs = [("1 replica", ReplicaOptions(1, replica_cpus=0 if gpu else cpus)),
               (f"{a.replicas} replicas, prefix-aware router",
                ReplicaOptions(a.replicas, replica_cpus=0 if gpu else cpus / a.replicas)),
               (f"{a.replicas} replicas, Ray's default router",
                ReplicaOptions(a.replicas, replica_cpus=0 if gpu else cpus / a.replicas, prefix_routing=False))]
    results = []
    for label, replicas in configs:
        load = LoadOptions(qps=a.qps, duration=a.duration, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens,
                           shared_prefix_tokens=a.shared_prefix_tokens, prefix_groups=a.prefix_groups, seed=a.seed,
                           progress=False)
        results.append(run_config(label, engine, replicas, load))
        r = results[-1]
        print(f"{label}: {r['achieved_rps']:.2f} req/s, {r['output_tokens_per_s']:.1f} output tok/s, "
              f"{r['failed']} failed, prefix-cache hit ratio {r['prefix_hit_ratio']:.2f} "
              f"(per replica {', '.join(f'{v:.2f}' for v in r['prefix_hit_ratio_per_replica'].values())}; "
              f"requests {list(r['finished_per_replica'].values())})", flush=True)
    base = results[0]["output_tokens_per_s"]
    print(f"\nmodel {a.model}, offered {a.qps} req/s for {a.duration:.0f} s, prompts: one of {a.prefix_groups} shared "
          f"prefixes of {a.shared_prefix_tokens} tokens + {a.prompt_tokens}, output {a.max_tokens} tokens, KV cache "
          f"{a.kv_cache_tokens or 'default'} tokens per replica\n")
    print("| configuration | req/s | output tok/s | vs 1 replica | prefix-cache hit ratio | failed |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['achieved_rps']:.2f} | {r['output_tokens_per_s']:.1f} | "
              f"{r['output_tokens_per_s'] / base:.2f}x | {r['prefix_hit_ratio']:.2f} | {r['failed']} |")


if __name__ == "__main__":
    main()
