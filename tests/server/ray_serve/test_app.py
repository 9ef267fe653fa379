"""The Ray Serve application as `serve run` and python -m server.ray_serve build it (no Ray cluster needed)."""
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")

from ray.serve import Application  # noqa: E402

from server.ray_serve.app import ReplicaOptions, build_app, parser, replica_options  # noqa: E402


def engine_deployment(app: Application):
    return app._bound_deployment.init_args[0]._bound_deployment   # the ingress is bound to the engine replicas


def test_build_app_takes_every_server_flag_as_key_value():
    app = build_app({"model": "tiny", "num_replicas": "2", "max_replicas": "4", "max_batch_size": "8",
                     "enforce-eager": "true", "no_prefix_routing": "false", "replica_gpus": "0"})
    assert isinstance(app, Application) and app._bound_deployment.name == "lmserve-ingress"
    engine = engine_deployment(app)
    config = engine._deployment_config
    engine_config, _ = engine.init_args
    assert engine.name == "lmserve-engine" and engine_config.max_batch_size == 8 and engine_config.enforce_eager
    assert config.max_ongoing_requests == 16   # 2 x --max-batch-size
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (2, 4)
    assert config.request_router_config.request_router_class.endswith("router.PrefixAffinityRouter")
    assert engine.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_fixed_replicas_and_rays_own_router():
    config = engine_deployment(build_app({"model": "tiny", "num_replicas": "3", "no_prefix_routing": True,
                                          "replica_gpus": 0}))._deployment_config
    assert config.num_replicas == 3 and config.autoscaling_config is None
    assert "PowerOfTwoChoices" in config.request_router_config.request_router_class


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        build_app({"no_such_flag": "1"})
    with pytest.raises(ValueError, match="max_replicas must be at least num_replicas"):
        replica_options(parser().parse_args(["--num-replicas", "3", "--max-replicas", "2"]))
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        ReplicaOptions(num_replicas=0)


def test_the_command_line_help():
    out = subprocess.run([sys.executable, "-m", "server.ray_serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--num-replicas" in out.stdout and "--max-batch-size" in out.stdout
