"""The HTTP side of server/auth.py: an ASGI middleware that checks each call's API key before any route runs."""
import math

from starlette.responses import JSONResponse

from server.auth import AccessControl, Decision
from server.http.protocol import AUDIT_DETAILS, RATE_CHARGE, ApiError

OPEN_PATHS = {"/health"}
ADMIN_ACTIONS = {"/v1/load_lora_adapter": "adapter_load", "/v1/unload_lora_adapter": "adapter_unload"}
_REFUSALS = {"unauthenticated": (401, "invalid_request_error", "invalid_api_key"),
             "forbidden": (403, "permission_error", "insufficient_role"),
             "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded")}


class AccessMiddleware:
    def __init__(self, app, access: AccessControl, open_paths: set[str] = OPEN_PATHS):
        self.app, self.access, self.open_paths = app, access, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.access.enabled or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        path = scope["path"]
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else None
        action = ADMIN_ACTIONS.get(path)
        decision = self.access.check(authorization, action is not None, f"{scope['method']} {path}", client)
        if decision.status != "ok":
            error = _refusal(decision)
            return await JSONResponse(error.body(), error.status, headers=error.headers)(scope, receive, send)

        def charge(count: int):
            more = self.access.charge(decision.key, count, f"{scope['method']} {path}", client)
            if more.status != "ok":
                raise _refusal(more)
        scope[RATE_CHARGE] = charge
        if action is None:
            return await self.app(scope, receive, send)
        recorded = False

        def record(outcome: str):
            nonlocal recorded
            recorded = True
            self.access.audit.record(action, outcome, decision.key.id, client, **scope.get(AUDIT_DETAILS, {}))

        async def send_and_note(message):
            if message["type"] == "http.response.start" and not recorded:
                record(str(message["status"]))   # before the client can see the response: the log is never behind it
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not recorded:
                record("error")


def _refusal(decision: Decision) -> ApiError:
    status, type_, code = _REFUSALS[decision.status]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if decision.retry_after:
        headers["Retry-After"] = str(math.ceil(decision.retry_after))
    return ApiError(status, decision.message, type_=type_, code=code, headers=headers)
