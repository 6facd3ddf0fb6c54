"""The edge's OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions
(streaming as server-sent events ending in `data: [DONE]`, and not), /health and /metrics.

`create_app(backend, model_name=..., api_key=..., tokenizer=...)` builds the app over a backend of
`serve.backends` (the split in process, or the edge half with a gRPC cloud). Requests are read
and validated here, bounded in body size, tokens and concurrency; every refusal is an OpenAI-style
`{"error": {...}}` body with a 4xx status, never a traceback. Generation runs in worker threads
(torch releases the GIL) so the event loop keeps serving /health and /metrics meanwhile."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitcli.errors import SplitLLMError
from splitcli.runtime.generate import SamplingConfig
from splitcli.serve.metrics import CONTENT_TYPE, RequestTimer, ServeMetrics
from splitcli.serve.schemas import ChatRequest, CompletionRequest, chat_messages
from splitcli.serve.text import TextAssembler

log = logging.getLogger("splitllm.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a prompt of ~250k tokens' worth of text: far over any context here
_DONE = object()


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.counted = False  # already in the error metrics (a failed generation counts itself)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


def _generation_error(exc: BaseException) -> ApiError:
    """What a client is told when generation fails after admission."""
    from splitcli.serve.client import RemoteError

    if isinstance(exc, RemoteError):
        return ApiError(502, _one_line(exc), "upstream_error", code=exc.code.name.lower())
    if isinstance(exc, SplitLLMError):
        return ApiError(500, _one_line(exc), "server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error")


class _Slots:
    """At most `limit` generations at once; over it a request gets 429 instead of queueing
    unboundedly (2 cores run a few sessions well, not hundreds)."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


class _Job:
    """One admitted generation: prompt ids, sampling, stops; its slot and timer are released
    exactly once however it ends (finished, failed, or the client went away)."""

    def __init__(self, api: "_Api", ids: list[int], cfg: SamplingConfig, stop: list[str]):
        self.api, self.ids, self.cfg, self.stop = api, ids, cfg, stop
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.timer = RequestTimer(api.metrics, len(ids))
        self._closed = False
        self._lock = threading.Lock()

    def close(self, error_status: int | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # No reason and no error: the client left mid-generation (499, as nginx logs it).
        status = error_status if error_status is not None else (None if self.finish_reason else 499)
        self.timer.end(self.finish_reason, status)
        self.api.slots.release()

    def usage(self) -> dict:
        p, c = len(self.ids), self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def pieces(self) -> Iterator[str]:
        """Text deltas as tokens arrive; sets finish_reason and completion_tokens at the end."""
        import torch

        eos = self.api.eos
        tokens = self.api.backend.generate(torch.tensor([self.ids], dtype=torch.long), self.cfg, eos)
        text = TextAssembler(self.api.tokenizer, self.stop)
        reason = None
        try:
            for tok in tokens:
                self.timer.token()
                self.completion_tokens += 1
                delta = text.push(int(tok))
                if delta:
                    yield delta
                if text.stopped or tok in eos:
                    reason = "stop"
                    break
            if reason is None:
                reason = "length" if self.completion_tokens >= self.cfg.max_new_tokens else "stop"
            rest = text.finish()
            if rest:
                yield rest
            self.finish_reason = reason
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # ends a remote session at once when a stop string cut generation short


class _Api:
    def __init__(self, backend, model_name, api_key, tokenizer, eos, max_body_bytes, max_tokens_limit,
                 default_max_tokens, max_running):
        self.backend, self.model_name, self.api_key, self.tokenizer = backend, model_name, api_key, tokenizer
        self.eos = eos
        self.max_body_bytes, self.max_tokens_limit = max_body_bytes, max_tokens_limit
        self.default_max_tokens = default_max_tokens
        self.slots = _Slots(max_running)
        self.metrics = ServeMetrics(model_name)
        self.created = int(time.time())

    # -- admission ------------------------------------------------------------------------

    async def check_auth(self, request: Request) -> None:  # async: no worker-thread hop per request
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise ApiError(413, f"request body over the limit of {self.max_body_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:  # chunked bodies have no content-length to check first
                raise ApiError(413, f"request body over the limit of {self.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting like [[[[...]]]]
            raise ApiError(400, f"the body is not valid JSON: {_one_line(exc)}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def parse(self, model, data: dict):
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc) from None
        if req.model != self.model_name:
            raise ApiError(404, f"the model '{req.model[:200]}' does not exist here; this server serves "
                                f"'{self.model_name}'", code="model_not_found", param="model")
        return req

    def admit(self, req, ids: list[int], default_max: int) -> _Job:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < self.backend.vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {self.backend.vocab_size})", param="prompt")
        context = self.backend.context_length
        room = self.max_tokens_limit if context is None else min(self.max_tokens_limit, context - len(ids))
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens long; this model's context is {context} tokens",
                           code="context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max, room)
        elif max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit}",
                           param="max_tokens")
        elif max_tokens > room:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                                f"{context} tokens", param="max_tokens", code="context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed)
        if not self.slots.acquire():
            raise ApiError(429, f"the server is busy ({self.slots.limit} generations running); retry later",
                           "rate_limit_error")
        return _Job(self, ids, cfg, req.stop_list())

    # -- tokenization ---------------------------------------------------------------------

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)  # token ids, checked against the vocabulary in admit
        if isinstance(prompt, list):
            prompt = prompt[0]
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty", param="prompt")
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = chat_messages(req)
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja errors) on odd messages
            raise ApiError(400, f"the chat template refused the messages: {_one_line(exc)}",
                           param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


# -- responses ------------------------------------------------------------------------------

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _events(job: _Job, chunk, include_usage: bool, first: dict | None) -> Iterator[str]:
    """Server-sent events of one streamed generation; a failure mid-stream ends it with an
    error event (then [DONE]), since the 200 status has already gone out."""
    try:
        if first is not None:
            yield _sse(chunk(first, None))
        for delta in job.pieces():
            yield _sse(chunk(delta, None))
        yield _sse(chunk(None, job.finish_reason))
        if include_usage:
            yield _sse({**chunk(None, None), "choices": [], "usage": job.usage()})
        job.close()
    except Exception as exc:  # noqa: BLE001 - the stream boundary: any failure becomes an error event
        err = _generation_error(exc)
        log.warning("generation %s failed: %s", job.id, _one_line(exc))
        job.close(err.status)
        yield _sse(err.body())
    yield "data: [DONE]\n\n"


async def _drain_in_threads(gen: Iterator[str], job: _Job):
    """Step a sync generator in worker threads. A cancelled await waits for its thread (anyio
    does not abandon it), so the generator is idle when closed here on a client disconnect."""
    try:
        while True:
            item = await run_in_threadpool(next, gen, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        gen.close()
        job.close()  # no-op when the generation ended; frees the slot of one that never started


def _stream(job: _Job, chunk, include_usage: bool, first=None) -> StreamingResponse:
    gen = _events(job, chunk, include_usage, first)
    return StreamingResponse(_drain_in_threads(gen, job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _complete(job: _Job) -> str:
    try:
        text = await run_in_threadpool(lambda: "".join(job.pieces()))
    except Exception as exc:  # noqa: BLE001 - the request boundary: a failure becomes an error body
        err = _generation_error(exc)
        log.warning("generation %s failed: %s", job.id, _one_line(exc))
        job.close(err.status)
        err.counted = True
        raise err from None
    finally:
        job.close()  # no-op after the line above; also frees the slot when the client went away
    return text


def create_app(backend, *, model_name: str, api_key: str | None, tokenizer, eos_token_ids: set[int] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_tokens_limit: int = 4096,
               default_max_tokens: int = 256, max_running: int = 8) -> FastAPI:
    """The OpenAI-compatible app over `backend`. `api_key` None serves /v1 without auth (tests,
    a loopback-only edge); otherwise every /v1 call needs `Authorization: Bearer <api_key>`.
    /health and /metrics stay open, as in vLLM and llama.cpp, so probes and scrapers need no key."""
    if not model_name:
        raise SplitLLMError("the served model needs a name")
    if api_key is not None and not api_key:
        raise SplitLLMError("the API key is empty: give a key or None for no auth")
    for name, value in (("max_body_bytes", max_body_bytes), ("max_tokens_limit", max_tokens_limit),
                        ("default_max_tokens", default_max_tokens), ("max_running", max_running)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SplitLLMError(f"{name} must be an integer >= 1, got {value!r}")
    if eos_token_ids is None:
        eos_token_ids = {t for t in (tokenizer.eos_token_id, *getattr(backend, "eos_token_ids", ()))
                         if isinstance(t, int)}
    api = _Api(backend, model_name, api_key, tokenizer, set(eos_token_ids), max_body_bytes, max_tokens_limit,
               default_max_tokens, max_running)
    app = FastAPI(title="splitllm edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    auth = Depends(api.check_auth)

    def refusal(status: int, body: dict) -> JSONResponse:
        api.metrics.error(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.counted:
            return JSONResponse(exc.body(), status_code=exc.status)
        return refusal(exc.status, exc.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return refusal(exc.status_code, ApiError(exc.status_code, str(exc.detail)).body())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return refusal(400, ApiError(400, _one_line(exc)).body())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: the client gets one line, the log gets the traceback.
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return refusal(500, ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": api.created, "owned_by": "splitllm"}

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[auth])
    async def model(name: str):
        if name != model_name:
            raise ApiError(404, f"the model '{name[:200]}' does not exist here", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(request: Request):
        req = api.parse(CompletionRequest, await api.read_json(request))
        # Tokenizing a long prompt takes ~1 s per MiB: off the event loop, so /health, /metrics and
        # the other requests' streams keep going meanwhile.
        ids = await run_in_threadpool(api.completion_ids, req)
        job = api.admit(req, ids, default_max=16)  # 16: the OpenAI API's default

        def chunk(text, finish):
            return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created,
                    "model": model_name, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                      "finish_reason": finish}]}

        if req.stream:
            return _stream(job, chunk, req.include_usage())
        text = await _complete(job)
        body = chunk(text, job.finish_reason)
        return {**body, "usage": job.usage()}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request):
        req = api.parse(ChatRequest, await api.read_json(request))
        ids = await run_in_threadpool(api.chat_ids, req)  # off the loop, as for completions
        job = api.admit(req, ids, default_max=api.default_max_tokens)
        base = {"id": f"chatcmpl-{job.id}", "created": job.created, "model": model_name}

        def chunk(delta, finish):
            if isinstance(delta, dict):
                content = delta
            else:
                content = {} if delta is None else {"content": delta}
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return _stream(job, chunk, req.include_usage(), first={"role": "assistant", "content": ""})
        text = await _complete(job)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": job.finish_reason}],
                "usage": job.usage()}

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=[auth])
    async def unknown(rest: str):
        # Declared last, so it only catches what no route above serves; its auth dependency keeps
        # the /v1 namespace closed to probing without a key.
        raise ApiError(404, f"no such endpoint: /v1/{rest[:200]}", code="not_found")

    return app
