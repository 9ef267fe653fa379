"""gRPC frontend (grpc.aio): protobuf <-> SamplingParams and engine.generate, nothing else.

Errors are status codes: INVALID_ARGUMENT with the same messages as HTTP, NOT_FOUND for an unknown model
or adapter. A cancelled call or an expired deadline cancels the handler, which closes the engine stream
and so aborts the request. Also serves grpc.health.v1 and server reflection.
"""
import dataclasses
import json
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.auth import AccessControl
from server.engine_client import EngineClient
from server.errors import ModelNotFoundError, RequestFailedError, ShutdownAbortError, status_of
from server.grpc_access import AccessInterceptor
from server.grpc_metrics import ResponseMetricsInterceptor
from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from server.lora import LoRAError
from server.outputs import RequestOutput
from server.sampling import ANY_OBJECT_SCHEMA, InvalidRequestError, SamplingParams, StructuredOutput

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "logprobs")


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, engine: EngineClient):
        self.engine = engine

    async def Generate(self, request, context):
        async for out in self._deltas(request, context):
            if out.token_ids or out.text:
                yield pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=out.token_ids, text=out.text,
                                                                 logprobs=_logprobs(out)))
            if out.finished:
                yield pb.GenerateResponse(final=_final(out))

    async def GenerateUnary(self, request, context):
        result = pb.GenerateResult()
        async for out in self._deltas(request, context):
            result.text += out.text
            result.token_ids.extend(out.token_ids)
            result.logprobs.extend(_logprobs(out))
            if out.finished:
                result.final.CopyFrom(_final(out))
        return result

    async def Tokenize(self, request, context):
        await self._check_model(request.model, "", context)
        try:
            ids = await self.engine.tokenize(request.text, add_special_tokens=request.add_special_tokens,
                                             parse_special_tokens=request.parse_special_tokens, param="text")
        except InvalidRequestError as e:
            await context.abort(status_code(e), str(e))
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.engine.max_model_len)

    async def ListModels(self, request, context):
        base, length = self.engine.model_name, self.engine.max_model_len
        return pb.ListModelsResponse(models=[pb.Model(id=base, max_model_len=length)] + [
            pb.Model(id=a.name, max_model_len=length, parent=base) for a in await self.engine.adapters()])

    async def LoadLoRAAdapter(self, request, context):
        try:
            adapter = await self.engine.load_adapter(request.lora_name, request.lora_path)
        except LoRAError as e:
            await context.abort(status_code(e), str(e))
        return pb.LoadLoRAAdapterResponse(lora_name=adapter.name, rank=adapter.rank)

    async def UnloadLoRAAdapter(self, request, context):
        try:
            await self.engine.unload_adapter(request.lora_name)
        except ModelNotFoundError as e:
            await context.abort(status_code(e), str(e))
        return pb.UnloadLoRAAdapterResponse(lora_name=request.lora_name)

    # --- translation ----------------------------------------------------------------------------
    async def _deltas(self, request, context):
        """The engine's deltas for this call; refusals become INVALID_ARGUMENT before anything is sent."""
        adapter = await self._check_model(request.model, request.adapter, context)
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is required: set text or token_ids")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        try:
            params = _sampling_params(request.sampling)
            params.structured_output = _structured_output(request)
            stream = self.engine.generate(prompt, params,
                                          request.request_id or f"grpc-{uuid.uuid4().hex}", adapter,
                                          request.parse_special_tokens)
            out = await anext(stream)
        except Exception as e:   # a refusal (server/errors.py STATUS) gets its code; anything else is a bug
            if status_of(e) is None:
                raise
            await context.abort(status_code(e), str(e))
        try:  # a cancelled call or expired deadline cancels us here; closing the stream aborts the request
            while True:
                yield out
                if out.finished:
                    return
                out = await anext(stream)
        except ShutdownAbortError as e:   # a last message that says so, then UNAVAILABLE
            yield dataclasses.replace(out, token_ids=[], text="", logprobs=None, finished=True, finish_reason="abort",
                                      stop_reason=None)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except RequestFailedError as e:
            await context.abort(status_code(e), str(e))
        finally:
            await stream.aclose()

    async def _check_model(self, model: str, adapter: str, context) -> str | None:
        """The adapter to run with (the adapter field, else `model` when it names one); NOT_FOUND otherwise."""
        try:
            if adapter:
                if model and model != self.engine.model_name:
                    raise ModelNotFoundError(f"the model {model!r} is not the base model {self.engine.model_name!r} "
                                             f"that adapter {adapter!r} runs on")
                loaded = [a.name for a in await self.engine.adapters()]
                if adapter not in loaded:
                    loaded = ", ".join(loaded) or "none"
                    raise ModelNotFoundError(f"the adapter {adapter!r} is not loaded (loaded: {loaded})")
                return adapter
            return await self.engine.check_model(model or None)
        except ModelNotFoundError as e:
            await context.abort(status_code(e), str(e))


def _sampling_params(s) -> SamplingParams:
    kwargs = {name: getattr(s, name) for name in _OPTIONAL if s.HasField(name)}
    if s.HasField("max_tokens"):
        kwargs["max_tokens"] = s.max_tokens
    elif s.max_tokens_to_context:
        kwargs["max_tokens"] = None
    return SamplingParams(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), min_tokens=s.min_tokens,
                          ignore_eos=s.ignore_eos, logit_bias=dict(s.logit_bias),
                          include_stop_str_in_output=s.include_stop_str_in_output, **kwargs)


def _structured_output(request) -> StructuredOutput | None:
    which = request.WhichOneof("structured_output")
    if which is None:
        return None
    if which == "json_object":
        if not request.json_object:
            raise InvalidRequestError("json_object must be true when set", "json_object")
        return StructuredOutput("json", ANY_OBJECT_SCHEMA, "json_object")
    if which == "choice":
        return StructuredOutput("choice", json.dumps(list(request.choice.choices)), "choice")
    return StructuredOutput({"json_schema": "json", "regex": "regex", "grammar": "grammar"}[which],
                            getattr(request, which), which)


def _logprobs(out: RequestOutput) -> list:
    return [pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in t.top_logprobs.items()])
            for t in out.logprobs or []]


def _final(out: RequestOutput) -> pb.GenerateFinal:
    final = pb.GenerateFinal(finish_reason=_FINISH[out.finish_reason], usage=pb.Usage(
        prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
        cached_tokens=out.num_cached_tokens))
    if isinstance(out.stop_reason, str):
        final.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        final.stop_token_id = out.stop_reason
    return final


async def start_grpc_server(engine: EngineClient, host: str, port: int, access: AccessControl | None = None
                            ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """access: API keys, roles and rate limits (server/auth.py); None serves everyone."""
    # as over HTTP; bound exclusively (gRPC shares ports by default), so a second server fails instead of splitting calls
    # the metrics interceptor first (outermost), so calls the access check refuses are counted too
    interceptors = [ResponseMetricsInterceptor()] + ([AccessInterceptor(access)] if access is not None else [])
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServicer_to_server(InferenceService(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port} (--grpc-port): is another server using it?")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer


def status_code(e: Exception) -> grpc.StatusCode:
    """The gRPC code for an engine error, from the table both frontends use (server/errors.py STATUS)."""
    status = status_of(e)
    return grpc.StatusCode.INTERNAL if status is None else getattr(grpc.StatusCode, status.grpc)
