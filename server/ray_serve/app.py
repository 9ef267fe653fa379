"""The Ray Serve application: an Ingress deployment in front of EngineReplica replicas, routed by
PrefixAffinityRouter, fixed in number or autoscaled on the requests they hold.

    serve run server.ray_serve.app:build_app model=/path/to/ckpt num_replicas=2 max_batch_size=64

build_app takes every python -m server flag as key=value (underscores or dashes), plus the replica options
of server/ray_serve/__main__.py.
"""
import argparse
from dataclasses import dataclass

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from server.config import EngineConfig, ServerConfig, from_flags, server_flags_parser
from server.ray_serve.deployments import EngineReplica, Ingress, WaitingRequestsPolicy
from server.ray_serve.router import PrefixAffinityRouter


@dataclass
class ReplicaOptions:
    num_replicas: int = 1
    max_replicas: int | None = None   # set: autoscale between num_replicas and this
    requests_per_replica: int | None = None   # autoscaling target (default: --max-batch-size)
    replica_cpus: float = 1.0
    replica_gpus: float | None = None   # default: 1 where CUDA is available, else 0
    max_ongoing_requests: int | None = None   # per replica, Ray's own cap (default: 2 x --max-batch-size)
    routing_stats_period_s: float = 2.0
    prefix_routing: bool = True   # False: Ray's default router (power of two choices), for comparison

    def __post_init__(self):
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1; got {self.num_replicas}")
        if self.requests_per_replica is not None and self.requests_per_replica < 1:
            raise ValueError(f"requests_per_replica must be at least 1; got {self.requests_per_replica}")
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas must be at least num_replicas ({self.num_replicas}); got {self.max_replicas}")


def add_replica_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("Ray Serve replicas")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (the least, when autoscaling)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas on the "
                   "requests they hold (running and waiting)")
    g.add_argument("--requests-per-replica", type=int, default=None, help="autoscaling target: requests in flight "
                   "per replica (default: --max-batch-size; more than that wait)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each engine replica")
    g.add_argument("--replica-gpus", type=float, default=None, help="GPUs per engine replica (default: 1 where "
                   "CUDA is available, else 0)")
    g.add_argument("--max-ongoing-requests", type=int, default=None, help="requests Ray sends one replica at once "
                   "(default: 2 x --max-batch-size)")
    g.add_argument("--no-prefix-routing", action="store_true", help="route with Ray's default router (the shorter "
                   "queue of two random replicas) instead of by prefix and adapter")


def replica_options(args: argparse.Namespace) -> ReplicaOptions:
    return ReplicaOptions(args.num_replicas, args.max_replicas, args.requests_per_replica, args.replica_cpus,
                          args.replica_gpus, args.max_ongoing_requests, prefix_routing=not args.no_prefix_routing)


def parser() -> argparse.ArgumentParser:
    p = server_flags_parser("python -m server.ray_serve",
                            "lmserve on Ray Serve: engine replicas behind prefix- and LoRA-aware routing.")
    add_replica_flags(p)
    return p


def application(engine: EngineConfig, server: ServerConfig, replicas: ReplicaOptions):
    import torch
    gpus = replicas.replica_gpus if replicas.replica_gpus is not None else float(torch.cuda.is_available())
    options = dict(ray_actor_options={"num_cpus": replicas.replica_cpus, "num_gpus": gpus},
                   max_ongoing_requests=replicas.max_ongoing_requests or 2 * engine.max_batch_size)
    if replicas.prefix_routing:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter, request_routing_stats_period_s=replicas.routing_stats_period_s)
    if replicas.max_replicas is not None and replicas.max_replicas > replicas.num_replicas:
        policy = AutoscalingPolicy(policy_function=WaitingRequestsPolicy,
                                   policy_kwargs={"requests_per_replica": replicas.requests_per_replica
                                                  or engine.max_batch_size})
        options["autoscaling_config"] = AutoscalingConfig(min_replicas=replicas.num_replicas,
                                                          max_replicas=replicas.max_replicas, look_back_period_s=30,
                                                          upscale_delay_s=30, downscale_delay_s=600, policy=policy)
    else:
        options["num_replicas"] = replicas.num_replicas
    engines = serve.deployment(EngineReplica, name="lmserve-engine", **options).bind(engine, server)
    return serve.deployment(Ingress, name="lmserve-ingress", ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=4096).bind(engines)


def build_app(args: dict[str, str]):
    """For `serve run server.ray_serve.app:build_app key=value ...`: the flags of python -m server.ray_serve."""
    argv = []
    for key, value in args.items():   # strings from `serve run`; a config file's YAML may give numbers or booleans
        flag, value = "--" + key.replace("_", "-"), str(value)
        argv += [flag] if value.lower() == "true" else [] if value.lower() == "false" else [flag, value]
    parsed = parser().parse_args(argv)
    return application(from_flags(EngineConfig, parsed), from_flags(ServerConfig, parsed), replica_options(parsed))
