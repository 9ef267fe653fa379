"""The gRPC side of server/auth.py: a server interceptor that checks the `authorization` metadata of each call.

The health service stays open. A refused call is answered by a handler of the same kind (unary or streaming)
that aborts with UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED; adapter loads and unloads are
audited with their outcome.
"""
import grpc

from server.auth import AccessControl

OPEN_PREFIX = "/grpc.health.v1.Health/"
ADMIN_ACTIONS = {"/lmserve.v1.Inference/LoadLoRAAdapter": "adapter_load",
                 "/lmserve.v1.Inference/UnloadLoRAAdapter": "adapter_unload"}
_CODES = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED, "forbidden": grpc.StatusCode.PERMISSION_DENIED,
          "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED}


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, access: AccessControl):
        self.access = access

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or not self.access.enabled or method.startswith(OPEN_PREFIX):
            return handler
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        action = ADMIN_ACTIONS.get(method)
        decision = self.access.check(authorization, action is not None, method, None, defer_audit=True)
        if decision.status != "ok":
            return _refusing(handler, _CODES[decision.status], decision.message,
                             lambda peer: self.access.audit.record(**decision.audit, client=peer))
        if action is None or handler.unary_unary is None:
            return handler
        return _audited(handler, self.access, action, decision.key.id)


def _refusing(handler, code: grpc.StatusCode, message: str, audit):
    """A handler that aborts with code; audit(peer) records the refusal with the caller's address."""
    async def refuse(request, context):
        audit(context.peer())
        await context.abort(code, message)

    async def refuse_stream(request, context):
        audit(context.peer())
        await context.abort(code, message)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_stream if handler.response_streaming else refuse,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _audited(handler, access: AccessControl, action: str, key: str):
    async def call(request, context):
        outcome = "error"
        try:
            response = await handler.unary_unary(request, context)
            outcome = "OK"
            return response
        finally:
            code = context.code()
            access.audit.record(action, code.name if isinstance(code, grpc.StatusCode) else outcome, key,
                                context.peer(), adapter=request.lora_name,
                                **({"path": request.lora_path} if action == "adapter_load" else {}))
    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)
