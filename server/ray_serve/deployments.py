"""The two Ray Serve deployments: EngineReplica, one whole lmserve server (its engine on this replica's device,
its HTTP routes) per replica, and Ingress, which reads each request once, hands it to the replica the router
picks, and relays the replica's response, streamed as it comes.

An engine replica answers through its own starlette app (server/http/app.py), so every route, error and SSE
stream is the single server's, and names itself in an `x-lmserve-replica` header. A client that leaves
cancels the ingress call, which cancels the replica's, which the app sees as a disconnect: the request is
aborted and its KV blocks freed, as on a single server.
"""
import asyncio
import logging
import math

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.config import EngineConfig, ServerConfig
from server.http.app import read_body
from server.http.protocol import ApiError
from server.ray_serve.http_call import HttpCall, routing_fields

log = logging.getLogger("lmserve.ray")

REPLICA_HEADER = "x-lmserve-replica"


class EngineReplica:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        from server.auth import build_access
        from server.engine_client import in_process_engine
        from server.http.app import build_app
        self.engine = in_process_engine(engine_config)
        access = build_access(server_config.api_key, server_config.api_keys_file, server_config.audit_log)
        self.app = build_app(self.engine, access, server_config.max_choices_per_request,
                             server_config.tool_call_parser, server_config.reasoning_parser,
                             server_config.open_metrics)
        self.name = serve.get_replica_context().replica_tag

    async def forward(self, call: HttpCall):
        """Runs the request through this replica's app; yields (status, headers), then the body's chunks."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
                 "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "root_path": "",
                 "query_string": call.query_string, "headers": call.headers, "client": call.client, "server": None}
        sent: asyncio.Queue = asyncio.Queue()
        left = asyncio.Event()
        body_read = False

        async def receive():
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        app = asyncio.ensure_future(self.app(scope, receive, sent.put))
        getter = None
        try:
            while True:
                if sent.empty():
                    if app.done():   # it returned (or raised) with nothing more to send
                        app.result()
                        return
                    getter = asyncio.ensure_future(sent.get())
                    await asyncio.wait({getter, app}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    m = getter.result()
                else:
                    m = sent.get_nowait()
                if m["type"] == "http.response.start":
                    yield m["status"], [*m.get("headers", []), (REPLICA_HEADER.encode(), self.name.encode())]
                elif m["type"] == "http.response.body":
                    if m.get("body"):
                        yield m["body"]
                    if not m.get("more_body"):
                        return
        finally:   # also when the ingress's call is cancelled: the app sees its client leave
            if getter is not None:
                getter.cancel()
            left.set()
            try:
                await asyncio.wait_for(app, timeout=30)
            except Exception:
                pass

    # async, so Ray runs them on the replica's event loop, which owns the engine's state (sync ones run on a thread)
    async def record_routing_stats(self) -> dict:
        core = self.engine.core
        return {"loaded_adapters": sorted(core.adapters), "waiting": core._metrics_state().waiting,
                "resident_adapters": sorted(a.name for a in core.lora_pool.resident)}

    async def record_autoscaling_stats(self) -> dict:
        state = self.engine.core._metrics_state()
        return {"running": float(state.running), "waiting": float(state.waiting)}

    async def check_health(self):
        """Ray replaces a replica whose engine died (its step loop failed) instead of routing to it."""
        if not self.engine.health():
            raise RuntimeError("the engine of this replica is dead")

    async def __del__(self):
        await self.engine.shutdown()


class WaitingRequestsPolicy:
    """Ray Serve autoscaling policy: as many replicas as the requests in flight (running and waiting) fill at
    `requests_per_replica` each. Replicas grow only once requests wait (below that, the running batches fit);
    Ray applies min/max_replicas and the up- and downscale delays."""

    def __init__(self, requests_per_replica: int):
        self.requests_per_replica = requests_per_replica

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        if "running" not in metrics:   # no replica has reported yet
            return ctx.current_num_replicas, {}
        in_flight = sum(metrics["running"].values()) + sum(metrics.get("waiting", {}).values())
        return max(1, math.ceil(in_flight / self.requests_per_replica)), {}


class Ingress:
    def __init__(self, engine):
        self.engine = engine   # a DeploymentHandle to EngineReplica

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_body(request)   # the single server's limits, before anything crosses to a replica
        except ApiError as e:
            return JSONResponse(e.body(), e.status)
        prompt, model = routing_fields(body)
        call = HttpCall(request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                        body, prompt, model, request.headers.get(REPLICA_HEADER),
                        tuple(request.client) if request.client else None)
        stream = self.engine.options(stream=True).forward.remote(call)
        try:
            status, headers = await stream.__anext__()   # a whole generation, when the answer is not streamed
        except Exception as e:   # no replica could take it, or the replica failed before answering
            stream.cancel()
            log.warning("request to %s failed before its answer began: %s", call.path, e)
            return JSONResponse(ApiError(503, f"no engine replica could serve the request: {type(e).__name__}",
                                         type_="service_unavailable").body(), 503)
        except BaseException:   # cancelled (the client left): the replica's call ends too, stated, not assumed
            stream.cancel()
            raise
        return RelayedResponse(status, headers, _chunks(stream))


class RelayedResponse(StreamingResponse):
    """An engine replica's response as it sent it: its status, its headers exactly, its body as it streams."""

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], chunks):
        super().__init__(chunks, status_code=status)
        self.raw_headers = list(raw_headers)


async def _chunks(stream):
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()   # the client left (or the relay ended): the replica stops and aborts the request
