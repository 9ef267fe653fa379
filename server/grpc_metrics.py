"""A gRPC server interceptor that counts each call by method and the status code it ended with
(lmserve_grpc_responses), as server/http/response_metrics.py counts HTTP responses."""
import asyncio
import os

import grpc

from server.metrics import grpc_responses


class ResponseMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.pid = str(os.getpid())

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:   # unknown methods gRPC answers itself; none streams in
            return handler
        count = self._counter(details.method)
        if handler.response_streaming:
            async def stream(request, context):
                try:
                    async for response in handler.unary_stream(request, context):
                        yield response
                except BaseException as e:
                    count(context, e)
                    raise
                count(context, None)
            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)

        async def unary(request, context):
            try:
                response = await handler.unary_unary(request, context)
            except BaseException as e:
                count(context, e)
                raise
            count(context, None)
            return response
        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def _counter(self, method: str):
        def count(context, error: BaseException | None):
            code = context.code()   # what abort() or set_code() set, if anything
            if not isinstance(code, grpc.StatusCode):
                code = (grpc.StatusCode.OK if error is None else
                        grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else
                        grpc.StatusCode.UNKNOWN)
            grpc_responses.labels(self.pid, method, code.name).inc()
        return count
