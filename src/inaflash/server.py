"""`inaflash serve`: an OpenAI-compatible HTTP API over one model (FastAPI + uvicorn).

With --parallel 1 (default) one generation runs at a time, on one worker thread; with --parallel N up to N run as one
batch (generate.Batcher: every decode step is one pass over the weights for all of them; requests join and leave
between steps). Other requests wait in a bounded queue (over the bound: 429).
A streamed generation whose client goes away is cancelled between two tokens, so the next request starts at once.
User errors get OpenAI-style error bodies ({"error": {"message", "type", "param", "code"}}) with 400/401/404/429.
SIGTERM/SIGINT stop it within a grace period: generations are cancelled at once, open streams end with an error event
and [DONE], new requests get 503, and the process exits (serve(grace=...)).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .api import Model
from .errors import InaflashError, StoreError
from .generate import Batcher, Generation, chat_template_ids, check_text

DEFAULT_GRACE_S = 10.0  # SIGTERM -> exit; systemd's and Kubernetes' defaults wait 90 and 30 s before SIGKILL
DEFAULT_MAX_TOKENS = 512  # when a request names none (capped by what the context leaves)
# Larger bodies get a 413 before they are read: a 10 MB body used to be parsed and tokenized on the event loop
# (/health stalled ~7 s) and left the process +700 MB. 4 MB is ~1M tokens of text, far beyond any context here.
MAX_BODY_BYTES = 4 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _utf8(text: str) -> str:
    """generate.check_text as a request validator: a lone surrogate in the JSON is a 400, not a 500."""
    try:
        return check_text(text, "text")
    except InaflashError as e:
        raise ValueError(str(e)) from None


Text = Annotated[StrictStr, AfterValidator(_utf8)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class SamplingRequest(BaseModel):
    # clients send fields we do not use (user, ...): kept in model_extra, where check_supported looks for those that
    # ask for something not served
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, strict=True)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, lt=2 ** 64)] | None = None
    stop: Text | list[Text] | None = None
    stream: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stream_options: dict | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: {len(stops)} stop strings, at most {MAX_STOP} are allowed", param="stop",
                           code="invalid_value")
        return stops


class ChatRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]


class ServerStopping(InaflashError):
    """The server is shutting down: the generation was stopped (stream: an error event; otherwise a 503)."""


# OpenAI request fields this server does not implement, refused by name (they used to be ignored with a 200): what a
# client asks for and does not get must be an error it can read, not an answer that silently lacks it.
UNSUPPORTED_FIELDS = {
    "logprobs": "logprobs are not returned by this server",
    "top_logprobs": "logprobs are not returned by this server",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": "response_format other than text is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of other than 1 is not supported",
    "suffix": "suffix is not supported",
}
# values that ask for nothing beyond what is served
UNSUPPORTED_OK = {"logprobs": (False, None, 0), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice":
                  (None, "none"), "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls":
                  (None, False, True), "logit_bias": (None, {}), "echo": (False, None), "best_of": (None, 1),
                  "suffix": (None, "")}
MAX_STOP = 4  # as OpenAI's API


def check_supported(body: dict) -> None:
    """400 naming the first field of `body` that asks for something this server does not do."""
    for name, why in UNSUPPORTED_FIELDS.items():
        if name not in body:
            continue
        value = body[name]
        if name == "response_format" and (value is None or (isinstance(value, dict) and value.get("type") == "text")):
            continue
        if any(value == ok and type(value) is type(ok) for ok in UNSUPPORTED_OK.get(name, ())):
            continue
        raise APIError(400, f"{name}: {why} (inaflash serves text completions only)", param=name,
                       code="unsupported_parameter")


class Metrics:
    def __init__(self):
        self.requests = self.completed = self.cancelled = self.rejected = 0
        self.prompt_tokens = self.generated_tokens = 0
        self.last: dict | None = None

    def record(self, gen: Generation, cancelled: bool) -> None:
        self.completed += not cancelled
        self.cancelled += cancelled
        self.prompt_tokens += gen.stats.prompt_tokens
        self.generated_tokens += gen.stats.generated_tokens
        self.last = gen.stats.to_dict()


class Server:
    def __init__(self, model: Model, api_key: str | None = None, max_queue: int = 8, parallel: int = 1):
        self.model, self.api_key, self.max_queue = model, api_key, max_queue
        self.parallel = parallel
        if parallel > model.engine.options.parallel:
            raise InaflashError(f"--parallel {parallel} needs a model loaded for it (load(..., parallel="
                                f"{parallel})): the planner counts one KV cache per sequence")
        self.batcher = Batcher(model.engine, parallel) if parallel > 1 else None
        # requests are tokenized on the event loop while the worker decodes: Rust tokenizers must not be shared
        self.tokenizer = copy.deepcopy(model.engine.tokenizer)
        # each running generation's text on a thread of its own (its tokens come from the batch, or it decodes alone)
        self.worker = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="inaflash-generate")
        # tokenization off the event loop, one request at a time (the tokenizer copy is not shared across threads)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inaflash-tokenize")
        self.lock: asyncio.Semaphore | None = None  # `parallel` running generations; created on the event loop
        self.pending = 0  # admitted requests: the one generating + those waiting
        self.admitted: set[Generation] = set()  # what shutdown() cancels
        self.stopping = threading.Event()  # set by stop(): new requests 503, stopped generations say why
        self.metrics = Metrics()
        self.started = int(time.time())

    def admit(self) -> None:
        if self.stopping.is_set():
            raise APIError(503, "server is shutting down", "server_error", code="server_shutting_down")
        if self.pending >= self.max_queue + self.parallel:
            self.metrics.rejected += 1
            raise APIError(429, f"server busy: {self.pending} requests already running or queued "
                                f"(--max-queue {self.max_queue}); retry later", "rate_limit_error",
                           code="queue_full")
        self.pending += 1
        self.metrics.requests += 1

    def prepare(self, req: SamplingRequest, prompt_ids: list[int]) -> Generation:
        if req.model != self.model.name:
            raise APIError(404, f"unknown model {req.model!r}; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        room = self.model.context - len(prompt_ids)
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > room:
            raise APIError(400, f"max_tokens {wanted} + {len(prompt_ids)} prompt tokens exceed the context of "
                                f"{self.model.context} tokens", param="max_tokens", code="context_length_exceeded")
        if room < 1:
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) fills the context of {self.model.context}",
                           param="messages", code="context_length_exceeded")
        return self.model.start(prompt_ids, wanted or min(DEFAULT_MAX_TOKENS, room), float(req.temperature),
                                float(req.top_p), req.seed, req.stops(), self.batcher)

    async def run(self, gen: Generation) -> None:
        """Non-streamed: wait for the slot, generate on the worker thread."""
        self.admitted.add(gen)
        try:
            async with self._lock():
                await asyncio.get_running_loop().run_in_executor(self.worker, gen.result)
            self.metrics.record(gen, cancelled=gen.cancelled.is_set())
            if self.stopping.is_set() and gen.finish_reason is None:
                raise APIError(503, "server is shutting down: the generation was stopped", "server_error",
                               code="server_shutting_down")
        finally:
            self.pending -= 1
            self.admitted.discard(gen)

    def stop(self) -> None:
        """Begin a shutdown (from a signal handler: only sets events): every admitted generation stops after the
        token or prefill chunk it is on, streams end with an error event and [DONE], new requests get 503."""
        self.stopping.set()
        for gen in list(self.admitted):
            gen.cancelled.set()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Cancel every admitted generation and wait (bounded) for the worker to stop, so the engine can be closed
        under it safely: before, two Ctrl-C with a request in flight closed the reader while the generation still
        waited on its reads, and the process hung forever. Returns whether the worker stopped in time."""
        for gen in list(self.admitted):
            gen.cancelled.set()
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        self.worker.shutdown(wait=False, cancel_futures=True)  # queued work never starts
        waiter = threading.Thread(target=self.worker.shutdown, daemon=True)  # joins the running one
        waiter.start()
        waiter.join(timeout)
        if self.batcher is not None:
            self.batcher.close(timeout)
        return not waiter.is_alive()

    async def pieces(self, gen: Generation):
        """Streamed: text pieces as the worker thread decodes them; cancelled if the consumer stops."""
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), gen.cancelled
        self.admitted.add(gen)

        def produce() -> None:
            try:
                for piece in gen:
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            except Exception as e:  # handed to the response
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            finally:
                gen.close()
                self.metrics.record(gen, cancelled=gen.finish_reason is None)
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        try:
            async with self._lock():
                loop.run_in_executor(self.worker, produce)
                try:
                    while True:
                        kind, value = await queue.get()
                        if kind == "end":
                            if self.stopping.is_set() and gen.finish_reason is None:
                                raise ServerStopping("server is shutting down: the generation was stopped")
                            break
                        if kind == "error":
                            raise value
                        yield value
                finally:
                    # a no-op when finished; otherwise the client left and this task is being cancelled: the
                    # worker stops after the prefill chunk or token it is on (the next generation queues behind it
                    # on the same single worker thread, so releasing the lock now is safe)
                    cancel.set()
        finally:
            self.pending -= 1
            self.admitted.discard(gen)

    def _lock(self) -> asyncio.Semaphore:
        if self.lock is None:
            self.lock = asyncio.Semaphore(self.parallel)
        return self.lock


def usage(gen: Generation) -> dict:
    p, c = gen.stats.prompt_tokens, gen.stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class BodyCap:
    """Refuses bodies over MAX_BODY_BYTES (by Content-Length) with a 413 before they are read. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, whose wrapped `receive` hides a client's disconnect from the endpoint."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"0").decode("latin-1")
            if not size.isdigit() or int(size) > MAX_BODY_BYTES:
                response = error_response(413, f"request body of {size} bytes is over the {MAX_BODY_BYTES} byte "
                                               "limit", code="request_too_large")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(model: Model, api_key: str | None = None, max_queue: int = 8, parallel: int = 1) -> FastAPI:
    server = Server(model, api_key, max_queue, parallel)
    app = FastAPI(title="inaflash", description="OpenAI-compatible API over an inaflash model")
    app.state.server = server

    app.add_middleware(BodyCap)

    async def tokenized(fn, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(server.tokenizing, fn, *args)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, param=".".join(loc) or None)

    @app.exception_handler(InaflashError)
    async def _inaflash_error(request: Request, e: InaflashError):
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # FastAPI's own (unparsable body, 404, 405)
        detail = "request body is not valid UTF-8 JSON" if e.detail == "There was an error parsing the body" \
            else str(e.detail)
        return error_response(e.status_code, detail, "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, e: StoreError):  # a damaged store is the server's fault, not the request's
        return error_response(500, str(e), "server_error")

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {server.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "pending": server.pending}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": server.started,
                                            "owned_by": "inaflash"}]}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        m = server.metrics
        b = server.batcher
        return {"model": model.name, "mode": model.engine.mode, "pending": server.pending, "requests": m.requests,
                "parallel": server.parallel, "batch_steps": b.steps if b else None,
                "batch_shared_steps": b.shared_steps if b else None,
                "completed": m.completed, "cancelled": m.cancelled, "rejected": m.rejected,
                "prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens, "last_generation": m.last}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest, request: Request):
        check_supported(req.model_extra or {})
        messages = [m.model_dump() for m in req.messages]
        if not server.tokenizer.chat_template:
            raise APIError(400, f"model {model.name} has no chat template: use /v1/completions")
        gen = server.prepare(req, await tokenized(chat_template_ids, server.tokenizer, messages))
        return await respond(req, gen, "chat.completion", "chatcmpl", request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        check_supported(req.model_extra or {})
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        gen = server.prepare(req, await tokenized(lambda p: server.tokenizer(p)["input_ids"], prompt))
        return await respond(req, gen, "text_completion", "cmpl", request)

    async def respond(req: SamplingRequest, gen: Generation, kind: str, prefix: str, request: Request):
        server.admit()
        rid, created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())
        chat = kind == "chat.completion"
        if not req.stream:
            async def watch() -> None:  # a client that leaves cancels its generation (prefill included)
                while not await request.is_disconnected():
                    await asyncio.sleep(0.25)
                gen.cancelled.set()

            watcher = asyncio.create_task(watch())
            try:
                await server.run(gen)
            finally:
                watcher.cancel()
            choice = ({"message": {"role": "assistant", "content": gen.text}} if chat
                      else {"text": gen.text, "logprobs": None})
            return {"id": rid, "object": kind, "created": created, "model": model.name,
                    "choices": [{"index": 0, **choice, "finish_reason": gen.finish_reason}], "usage": usage(gen)}

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                if first:
                    delta = {"role": "assistant", **delta}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model.name,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            first = True
            try:
                async for piece in server.pieces(gen):
                    yield chunk(piece, first=first)
                    first = False
            except Exception as e:  # headers are sent: say it in the stream (OpenAI's error shape), then end it
                message = str(e) if isinstance(e, InaflashError) else f"generation failed: {type(e).__name__}: {e}"
                body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
            if first and chat:
                yield chunk(None, first=True)
            yield chunk(None, gen.finish_reason)
            if (req.stream_options or {}).get("include_usage"):
                body = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                        "model": model.name, "choices": [], "usage": usage(gen)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def uvicorn_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, grace: float = DEFAULT_GRACE_S,
                   log_level: str = "info"):
    """The uvicorn server for `app`, whose SIGTERM/SIGINT stop generating at once and exit within `grace` seconds
    (uvicorn alone waited for every open stream to finish: a 3000-token stream kept a SIGTERMed server up until
    SIGKILL). `inaflash loadtest` drives the same handle_exit."""
    import uvicorn

    state = app.state.server

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.stop()  # streams end (error event + [DONE]), so uvicorn's wait for open connections is short
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn raises the signal again once it has stopped, which killed the process before the model was
            # closed; a stop asked for by a signal is a normal end here (exit 0 after the caller's cleanup)
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Uvicorn(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace))


def serve(model: Model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 8, grace: float = DEFAULT_GRACE_S, parallel: int = 1) -> None:
    """Serve until SIGTERM/SIGINT, then exit within `grace` seconds (uvicorn_server)."""
    app = create_app(model, api_key, max_queue, parallel)
    state = app.state.server
    try:
        uvicorn_server(app, host, port, grace).run()
    finally:  # the caller closes the model next: nothing may still be generating on it
        state.stop()
        if not state.shutdown(timeout=grace):
            logging.getLogger("inaflash").warning(f"a generation did not stop within {grace:g} s of shutdown")
