"""python -m bench.baseline_server: Hugging Face transformers `generate` behind lmserve's HTTP API, for bench.compare.

Two ways the quick-start tutorials serve a model:
  --mode sequential   one request at a time, each a `generate` call of its own;
  --mode static       static batches: up to --batch-size requests that arrived within --max-wait-ms are
                      left-padded into one `generate` call, and the next batch starts when it has finished.
It answers /v1/models, /tokenize, /health and /v1/completions (token-id or text prompts, max_tokens, ignore_eos,
stream with usage), greedy only. Outputs stream token by token through a transformers streamer.
"""
import argparse
import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)   # token ids, then None at the end


class RowStreamer:
    """A transformers streamer handing each row's new token to its job's queue, from the generate thread."""

    def __init__(self, jobs: list[Job], eos: set[int], loop: asyncio.AbstractEventLoop):
        self.jobs, self.eos, self.loop = jobs, eos, loop
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for i, token in enumerate(value.view(len(self.jobs), -1)[:, -1].tolist()):
            job = self.jobs[i]
            if self.done[i]:
                continue
            self.counts[i] += 1
            self.loop.call_soon_threadsafe(job.tokens.put_nowait, token)
            if self.counts[i] >= job.max_tokens or (token in self.eos and not job.ignore_eos):
                self.done[i] = True
                self.loop.call_soon_threadsafe(job.tokens.put_nowait, None)

    def end(self):
        for i, job in enumerate(self.jobs):
            if not self.done[i]:
                self.done[i] = True
                self.loop.call_soon_threadsafe(job.tokens.put_nowait, None)


class Generator:
    def __init__(self, model, tokenizer, mode: str, batch_size: int, max_wait_ms: float):
        self.model, self.tokenizer = model, tokenizer
        self.mode, self.batch_size, self.max_wait = mode, batch_size if mode == "static" else 1, max_wait_ms / 1000
        self.pending: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.pending.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.batch_size and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.pending.get(), left))
                except TimeoutError:
                    break
            streamer = RowStreamer(batch, self.eos, loop)
            try:
                await loop.run_in_executor(self.executor, self._generate, batch, streamer)
            finally:
                streamer.end()

    @torch.inference_mode()
    def _generate(self, batch: list[Job], streamer: RowStreamer):
        width = max(len(j.prompt_ids) for j in batch)
        device = self.model.device
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch], device=device)
        longest = max(j.max_tokens for j in batch)
        ignore_eos = all(j.ignore_eos for j in batch)
        self.model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest if ignore_eos else 0,
                            do_sample=False, pad_token_id=self.pad, streamer=streamer)


def build_app(generator: Generator, model_name: str, max_model_len: int) -> Starlette:
    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=status)

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "baseline",
                                                         "max_model_len": max_model_len}]})

    async def health(_: Request):
        return Response(status_code=200)

    async def tokenize(request: Request):
        body = await request.json()
        tokens = generator.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len})

    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        ids = generator.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            return error(400, "prompt must be a string or a list of token ids", "prompt")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_model_len - len(ids):
            return error(400, f"max_tokens must be between 1 and {max_model_len - len(ids)} for this prompt; "
                              f"got {max_tokens}", "max_tokens")
        job = Job(ids, max_tokens, bool(body.get("ignore_eos", False)))
        await generator.pending.put(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def usage(n):
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if body.get("stream"):
            async def events():
                n = 0
                while (token := await job.tokens.get()) is not None:
                    n += 1
                    text = generator.tokenizer.decode([token])
                    yield f"data: {json.dumps(head | {'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps(head | {'choices': [], 'usage': usage(n)})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        out = []
        while (token := await job.tokens.get()) is not None:
            out.append(token)
        finish = "length" if len(out) == max_tokens else "stop"
        return JSONResponse(head | {"choices": [{"index": 0, "text": generator.tokenizer.decode(out),
                                                 "finish_reason": finish}], "usage": usage(len(out))})

    @contextlib.asynccontextmanager
    async def lifespan(_):
        task = asyncio.get_running_loop().create_task(generator.run())
        yield
        task.cancel()

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health),
                             Route("/tokenize", tokenize, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"])], lifespan=lifespan)


def load(model: str | None, device: str, dtype: str):
    """transformers' own model and tokenizer for the checkpoint lmserve would serve (its default model too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model_source import resolve_model
    from server.synthetic_model import hf_model_for, is_synthetic
    path = resolve_model(model).path
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.float16 if device.startswith("cuda") else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model is not None and is_synthetic(model):
        hf = hf_model_for(model, torch_dtype, torch.device(device))
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    return hf.eval(), tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as python -m server --model (default: lmserve's default model)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--mode", choices=["sequential", "static"], default="sequential")
    p.add_argument("--batch-size", type=int, default=16, help="static batches' largest size")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="how long a static batch waits to fill")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    import uvicorn
    model, tokenizer = load(args.model, args.device, args.dtype)
    name = args.served_model_name or f"baseline-{args.mode}"
    app = build_app(Generator(model, tokenizer, args.mode, args.batch_size, args.max_wait_ms), name,
                    model.config.max_position_embeddings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
