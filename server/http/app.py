"""The HTTP app: OpenAI-compatible routes, /health, /tokenize, /detokenize, and the minimal /generate.

Every error is OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for bad input (wrong
method or content included), 404 for an unknown model or route, 500 only for the server's own failures.

POST /generate {"prompt": str | [int], "model": str, "stream": bool, "request_id": str, ...SamplingParams fields}
answers {"text", "token_ids", "finish_reason", "usage"}, or server-sent events of deltas when streaming.
"""
import asyncio
import dataclasses
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.engine_client import EngineClient
from server.errors import ModelNotFoundError, RequestFailedError, ServerBusyError, ShuttingDownError
from server.auth import AccessControl
from server.http.access import OPEN_PATHS, AccessMiddleware
from server.http.adapter_routes import load_lora_adapter, unload_lora_adapter
from server.http.response_metrics import ResponseMetricsMiddleware
from server.http.openai_routes import OpenAIRoutes, sse_response, until_disconnect
from server.http.protocol import (AUDIT_DETAILS, BODY_TIMEOUT_S, DEFAULT_MAX_CHOICES, MAX_BODY_BYTES, ApiError,
                                  engine_refusal, optional_field, parse_chat)
from server.metrics import CONTENT_TYPE
from server.outputs import RequestOutput
from server.sampling import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


async def read_body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY_BYTES of it, within BODY_TIMEOUT_S; ApiError otherwise."""
    too_large = ApiError(400, f"the request body is larger than {MAX_BODY_BYTES} bytes, the most accepted",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):   # a body dripped in byte by byte holds nothing for long
            async for chunk in request.stream():   # read no further than the limit, whatever the header said
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise too_large
                chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(499, "client disconnected", type_="client_disconnected") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s", type_="timeout_error",
                       code="body_timeout") from None
    return b"".join(chunks)


async def json_body(request: Request) -> dict:
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body must be a JSON object") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def build_app(engine: EngineClient, access: AccessControl | None = None,
              max_choices_per_request: int = DEFAULT_MAX_CHOICES, tool_call_parser: str = "auto",
              reasoning_parser: str | None = None, open_metrics: bool = False) -> Starlette:
    """access: API keys, roles and rate limits (server/auth.py); None serves everyone. open_metrics: /metrics
    needs no key either."""
    model_name = engine.model_name
    openai = OpenAIRoutes(engine, model_name, max_choices_per_request, tool_call_parser, reasoning_parser)
    created = int(time.time())

    async def health(_: Request) -> Response:
        return Response(status_code=200 if engine.health() else 503)

    async def metrics(_: Request) -> Response:
        return Response(await engine.metrics(), media_type=CONTENT_TYPE)

    async def models(_: Request) -> Response:
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "lmserve",
                "root": engine.model_path, "parent": None, "max_model_len": engine.max_model_len}
        adapters = [base | {"id": a.name, "root": a.path, "parent": model_name} for a in await engine.adapters()]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    async def completions(request: Request) -> Response:
        return await openai.completions(request, await json_body(request))

    async def chat_completions(request: Request) -> Response:
        return await openai.chat(request, await json_body(request))

    async def tokenize(request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body.get("messages"), list):
            messages = parse_chat({"messages": body["messages"]}).messages
            try:
                tokens = await engine.tokenize_chat(messages)
            except InvalidRequestError as e:
                raise engine_refusal(e) from None
            except Exception as e:
                raise ApiError(400, f"the chat template could not render these messages: {e}", "messages") from None
        elif isinstance(body.get("prompt"), str):
            add_special = optional_field(body, "add_special_tokens", bool, default=True)
            parse_special = optional_field(body, "parse_special_tokens", bool, default=False)
            try:
                tokens = await engine.tokenize(body["prompt"], add_special, parse_special)
            except InvalidRequestError as e:
                raise engine_refusal(e) from None
        else:
            raise ApiError(400, "send prompt (a string) or messages (a list)", "prompt")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})

    async def detokenize(request: Request) -> Response:
        tokens = (await json_body(request)).get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < engine.vocab_size for t in tokens):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {engine.vocab_size})", "tokens")
        return JSONResponse({"prompt": engine.detokenize(tokens)})

    async def generate(request: Request) -> Response:
        body = await json_body(request)
        unknown = sorted(set(body) - _PARAM_FIELDS - {"prompt", "stream", "request_id", "model", "parse_special_tokens"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0])
        try:
            params = SamplingParams(**{k: v for k, v in body.items() if k in _PARAM_FIELDS})
            prompt = body.get("prompt")
            if not isinstance(prompt, (str, list)):
                raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise InvalidRequestError("model must be a string: the base model's or a LoRA adapter's name", "model")
            parse_special = optional_field(body, "parse_special_tokens", bool, default=False)
            stream = engine.generate(prompt, params, body.get("request_id"), model, parse_special)
            first = await until_disconnect(request, anext(stream))  # refusals surface here, before any byte
        except (InvalidRequestError, ModelNotFoundError, ServerBusyError, ShuttingDownError, RequestFailedError) as e:
            raise engine_refusal(e) from None
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        if body.get("stream"):
            return sse_response(_deltas(first, stream), [stream])
        try:
            return JSONResponse(_merge(await until_disconnect(request, _drain(first, stream))))
        finally:
            await stream.aclose()  # after a disconnect, closing the stream aborts the request

    async def load_adapter(request: Request) -> Response:
        body = await json_body(request)
        request.scope[AUDIT_DETAILS] = {"adapter": str(body.get("lora_name"))[:200],
                                        "path": str(body.get("lora_path"))[:1000]}
        return await load_lora_adapter(engine, body)

    async def unload_adapter(request: Request) -> Response:
        body = await json_body(request)
        request.scope[AUDIT_DETAILS] = {"adapter": str(body.get("lora_name"))[:200]}
        return await unload_lora_adapter(engine, body)

    async def api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def request_failed(_: Request, exc: RequestFailedError) -> Response:
        """A request the engine ended (timed out, or failed alone) after it started, before a byte was sent."""
        return await api_error(_, engine_refusal(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return JSONResponse(ApiError(404, f"no route {request.url.path}", type_="NotFoundError",
                                         code="not_found").body(), 404)
        if exc.status_code == 405:
            return JSONResponse(ApiError(400, f"{request.method} is not allowed on {request.url.path}",
                                         code="method_not_allowed").body(), 400)
        return JSONResponse(ApiError(400, str(exc.detail)).body(), 400)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("request to %s failed", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {exc}", type_="internal_error").body(), 500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
    ]
    # outermost, so refusals by the access check are counted too; the access check is installed even with no
    # key yet: a SIGHUP can add keys to an empty --api-keys-file
    middleware = [Middleware(ResponseMetricsMiddleware, routes={r.path for r in routes})]
    open_paths = OPEN_PATHS | ({"/metrics"} if open_metrics else set())
    middleware += [Middleware(AccessMiddleware, access=access, open_paths=open_paths)] if access is not None else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={
        ApiError: api_error, RequestFailedError: request_failed, HTTPException: http_error, Exception: internal_error})


async def _drain(first: RequestOutput, stream) -> list[RequestOutput]:
    return [first] + [o async for o in stream]


async def _deltas(first: RequestOutput, stream):
    yield _delta(first)
    async for out in stream:
        yield _delta(out)


def _scored(t) -> dict | None:
    if t is None:
        return None
    return {"token_id": t.token_id, "logprob": t.logprob, "top_logprobs": {str(k): v for k, v in t.top_logprobs.items()}}


def _delta(out: RequestOutput) -> dict:
    d = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
    if out.logprobs is not None:
        d["logprobs"] = [_scored(t) for t in out.logprobs]
    if out.prompt_logprobs is not None:
        d["prompt_logprobs"] = [_scored(t) for t in out.prompt_logprobs]
    if out.finished:
        d["usage"] = _usage(out)
    return d


def _merge(outputs: list[RequestOutput]) -> dict:
    last = outputs[-1]
    merged = {"text": "".join(o.text for o in outputs), "token_ids": [t for o in outputs for t in o.token_ids],
              "finish_reason": last.finish_reason, "usage": _usage(last)}
    if last.stop_reason is not None:
        merged["stop_reason"] = last.stop_reason
    if outputs[0].logprobs is not None:
        merged["logprobs"] = [_scored(t) for o in outputs for t in o.logprobs or []]
    if outputs[0].prompt_logprobs is not None:
        merged["prompt_logprobs"] = [_scored(t) for t in outputs[0].prompt_logprobs]
    return merged


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens, "cached_tokens": out.num_cached_tokens}
