"""An ASGI middleware that counts each HTTP response by route and status code (lmserve_http_responses)."""
import os

from server.metrics import http_responses


class ResponseMetricsMiddleware:
    def __init__(self, app, routes: set[str]):
        self.app, self.routes = app, routes   # other paths are counted as "other": a client picks no label values
        # with --api-server-count > 1 each scrape reaches one process: its pid keeps each one's counts a series
        self.pid = str(os.getpid())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = False

        async def send_and_count(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                http_responses.labels(self.pid, route, str(message["status"])).inc()
            await send(message)
        try:
            await self.app(scope, receive, send_and_count)
        except Exception:
            if not started:   # the server error handler, outside every middleware, answers 500
                http_responses.labels(self.pid, route, "500").inc()
            raise
