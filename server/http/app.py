"""The HTTP app: /health and the minimal /generate endpoint (the OpenAI routes build on the same engine calls).

POST /generate {"prompt": str | [int], "stream": bool, "request_id": str, ...SamplingParams fields}
answers {"text", "token_ids", "finish_reason", "usage"}, or server-sent events of deltas when streaming.
"""
import dataclasses
import json

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.engine import AsyncEngine
from server.outputs import RequestOutput
from server.sampling import InvalidRequestError, SamplingParams

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def error_response(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


def build_app(engine: AsyncEngine) -> Starlette:
    async def health(_: Request) -> Response:
        return Response(status_code=200 if engine.health() else 503)

    async def generate(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "request body must be a JSON object")
        except ClientDisconnect:
            return Response(status_code=499)
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        unknown = sorted(set(body) - _PARAM_FIELDS - {"prompt", "stream", "request_id"})
        if unknown:
            return error_response(400, f"unknown field {unknown[0]!r}", unknown[0])
        try:
            params = SamplingParams(**{k: v for k, v in body.items() if k in _PARAM_FIELDS})
            prompt = body.get("prompt")
            if not (isinstance(prompt, str) or isinstance(prompt, list)):
                raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
            stream = engine.generate(prompt, params, body.get("request_id"))
            first = await anext(stream)  # validation errors surface here, before any byte is sent
        except InvalidRequestError as e:
            return error_response(400, str(e), e.param)
        except (TypeError, ValueError) as e:
            return error_response(400, str(e))
        if body.get("stream"):
            return StreamingResponse(_sse(first, stream), media_type="text/event-stream")
        outputs = [first] + [o async for o in stream]
        return JSONResponse(_merge(outputs))

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/generate", generate, methods=["POST"])])


async def _sse(first: RequestOutput, stream):
    try:
        yield f"data: {json.dumps(_delta(first))}\n\n"
        async for out in stream:
            yield f"data: {json.dumps(_delta(out))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # a disconnected client lands here: closing the stream aborts the request


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
