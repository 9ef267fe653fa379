"""python -m server.ray_serve --num-replicas N [every python -m server flag]: lmserve on a local (or, with
RAY_ADDRESS, an existing) Ray cluster, serving HTTP on --host/--port until SIGINT or SIGTERM."""
import logging
import os
import signal
import sys
import threading

from server.config import EngineConfig, ServerConfig, from_flags
from server.ray_serve.app import application, parser, replica_options

log = logging.getLogger("lmserve.ray")


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, server, replicas = from_flags(EngineConfig, args), from_flags(ServerConfig, args), replica_options(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    import ray
    from ray import serve
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    joined = bool(os.environ.get("RAY_ADDRESS"))   # a cluster of someone else's: leave its other apps running
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(application(engine, server, replicas), name="lmserve", route_prefix="/")
        log.info("serving on http://%s:%d with %d engine replica(s)", server.host, server.port, replicas.num_replicas)
        stop.wait()
        log.info("shutting down")
    finally:
        if joined:
            serve.delete("lmserve")
        else:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
