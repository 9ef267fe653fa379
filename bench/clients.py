"""The load generator's clients: one pooled aiohttp session for HTTP, one grpc.aio channel for gRPC.

Each sends a PlannedRequest and returns a RequestRecord of what happened and when (seconds on the run's
clock): the send, every streamed chunk, the end, token counts, and an error type when it failed. They
also fetch what the load run needs from the server first: its models and a vocabulary of token ids.
"""
import asyncio
import json
import time
from dataclasses import dataclass, field

from bench.workload import LOAD_SCHEMA, PlannedRequest

# Tokenized by the server to get token ids its model knows; prompts are drawn from them.
VOCABULARY_TEXT = ("The quick brown fox jumps over the lazy dog. Requests arrive at random times and a scheduler "
                   "batches them. Numbers 0 1 2 3 4 5 6 7 8 9 and words like weather, garden, window, server, "
                   "token, cache, memory, question, answer, journey, morning, evening, spring.")


@dataclass
class RequestRecord:
    index: int
    model: str
    scheduled: float                    # when the workload planned to send it
    planned_prompt_tokens: int
    max_tokens: int
    start: float = 0.0                  # when it was sent
    end: float = 0.0                    # when the response ended (or failed)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with output
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None            # http_429, grpc_RESOURCE_EXHAUSTED, timeout, connection, ...
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.end - self.start


class HttpClient:
    """/v1/completions with token-id prompts and ignore_eos, streamed (SSE) or not."""

    def __init__(self, url: str, stream: bool, timeout: float, clock):
        import aiohttp
        self.url = url.rstrip("/")
        self.stream = stream
        self.clock = clock
        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                             timeout=aiohttp.ClientTimeout(total=timeout))

    async def models(self) -> tuple[str, list[str]]:
        """(base model, adapters)"""
        async with self.session.get(f"{self.url}/v1/models") as r:
            r.raise_for_status()
            data = (await r.json())["data"]
        return data[0]["id"], [m["id"] for m in data[1:]]

    async def vocabulary(self) -> list[int]:
        async with self.session.post(f"{self.url}/tokenize",
                                     json={"prompt": VOCABULARY_TEXT, "add_special_tokens": False}) as r:
            r.raise_for_status()
            return sorted(set((await r.json())["tokens"]))

    async def send(self, req: PlannedRequest, record: RequestRecord):
        body = {"model": req.model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": self.stream}
        if req.structured:
            body["guided_json"] = LOAD_SCHEMA
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        record.start = self.clock()
        try:
            async with self.session.post(f"{self.url}/v1/completions", json=body) as r:
                if r.status != 200:
                    record.error, record.error_message = f"http_{r.status}", _error_message(await r.text())
                elif self.stream:
                    await self._read_events(r, record)
                else:
                    self._take_usage(await r.json(), record)
                    record.chunk_times.append(self.clock())
        except asyncio.TimeoutError:
            record.error, record.error_message = "timeout", "the request outlasted --request-timeout"
        except self._aiohttp.ClientError as e:
            record.error, record.error_message = "connection", f"{type(e).__name__}: {e}"
        record.end = self.clock()

    async def _read_events(self, r, record: RequestRecord):
        done = False
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                record.error, record.error_message = "stream_error", _error_message(data)
                return
            if chunk.get("choices"):
                record.chunk_times.append(self.clock())
            if chunk.get("usage"):
                self._take_usage(chunk, record)
        if not done:
            record.error, record.error_message = "truncated", "the stream ended without [DONE]"

    @staticmethod
    def _take_usage(body: dict, record: RequestRecord):
        record.prompt_tokens = body["usage"]["prompt_tokens"]
        record.output_tokens = body["usage"]["completion_tokens"]

    async def close(self):
        await self.session.close()


class GrpcClient:
    """lmserve.v1.Inference: Generate (a stream) or GenerateUnary, with token-id prompts and ignore_eos."""

    def __init__(self, target: str, stream: bool, timeout: float, clock):
        import grpc

        from server.grpc_gen import inference_pb2, inference_pb2_grpc
        self.pb, self.grpc = inference_pb2, grpc
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.stream, self.timeout, self.clock = stream, timeout, clock
        self.base_model = ""

    async def models(self) -> tuple[str, list[str]]:
        models = (await self.stub.ListModels(self.pb.ListModelsRequest(), timeout=30)).models
        self.base_model = next(m.id for m in models if not m.parent)
        return self.base_model, [m.id for m in models if m.parent]

    async def vocabulary(self) -> list[int]:
        r = await self.stub.Tokenize(self.pb.TokenizeRequest(text=VOCABULARY_TEXT, add_special_tokens=False), timeout=30)
        return sorted(set(r.token_ids))

    async def send(self, req: PlannedRequest, record: RequestRecord):
        pb = self.pb
        message = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=req.prompt_token_ids), adapter="" if req.model == self.base_model else req.model,
            sampling=pb.SamplingParameters(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True))
        if req.structured:
            message.json_schema = json.dumps(LOAD_SCHEMA)
        record.start = self.clock()
        try:
            if self.stream:
                async for response in self.stub.Generate(message, timeout=self.timeout):
                    if response.WhichOneof("response") == "chunk":
                        record.chunk_times.append(self.clock())
                    else:
                        record.prompt_tokens = response.final.usage.prompt_tokens
                        record.output_tokens = response.final.usage.completion_tokens
            else:
                result = await self.stub.GenerateUnary(message, timeout=self.timeout)
                record.chunk_times.append(self.clock())
                usage = result.final.usage
                record.prompt_tokens, record.output_tokens = usage.prompt_tokens, usage.completion_tokens
        except self.grpc.aio.AioRpcError as e:
            code = e.code()
            record.error = "timeout" if code == self.grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc_{code.name}"
            record.error_message = e.details() or ""
        record.end = self.clock()

    async def close(self):
        await self.channel.close()


def _error_message(text) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(text)[:200]


def run_clock():
    """Seconds since this call, on the monotonic clock."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
