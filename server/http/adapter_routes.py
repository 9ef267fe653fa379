"""Runtime LoRA adapter management: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names).

load: {"lora_name", "lora_path"} with the path inside --lora-dir; 200 once it can serve, 400 saying what is
wrong (nothing changes then). unload: {"lora_name"}; new requests for it get 404 at once, and the answer comes
when its in-flight requests have finished.
"""
from starlette.responses import JSONResponse, Response

from server.engine_client import EngineClient
from server.errors import ModelNotFoundError
from server.http.protocol import ApiError, model_not_found
from server.lora import LoRAError


def _string_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a non-empty string", name)
    return value


async def load_lora_adapter(engine: EngineClient, body: dict) -> Response:
    name, path = _string_field(body, "lora_name"), _string_field(body, "lora_path")
    try:
        adapter = await engine.load_adapter(name, path)
    except LoRAError as e:
        raise ApiError(400, str(e), "lora_path" if "path" in str(e) or "--lora-dir" in str(e) else "lora_name") from None
    return JSONResponse({"lora_name": adapter.name, "rank": adapter.rank, "status": "loaded"})


async def unload_lora_adapter(engine: EngineClient, body: dict) -> Response:
    name = _string_field(body, "lora_name")
    try:
        await engine.unload_adapter(name)
    except ModelNotFoundError as e:
        raise model_not_found(str(e), "lora_name") from None
    return JSONResponse({"lora_name": name, "status": "unloaded"})
