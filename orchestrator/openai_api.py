"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from backends.base import BackendError, SamplingParams, TokenEvent
from orchestrator import metrics
from orchestrator.errors import APIError, error_body, error_responses
from orchestrator.hot_path import HotRoute
from orchestrator.placement import Overloaded
from orchestrator.serving import Job
from orchestrator.sse import ClientWatch, SSEResponse

log = logging.getLogger(__name__)


def _utf8(value: Any) -> Any:
    """`value`, if every string in it is encodable as UTF-8. JSON can carry a lone surrogate
    ("\\ud800") that no tokenizer takes: it is the client's error (400), not the server's."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    elif isinstance(value, list):
        for item in value:
            _utf8(item)
    elif isinstance(value, dict):
        for item in value.values():
            _utf8(item)
    return value


def _utf8_text(value: Any) -> Any:
    """`_utf8` of a field that is text or token ids (validated already: ids are ints, no text)."""
    return _utf8(value) if isinstance(value, str) else value


# OpenAI fields this server does not implement, with the values (besides null) that ask for nothing:
# those are accepted, anything else is refused (400, code unsupported_parameter), never ignored.
_NOOPS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
}


def _documented(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A field's `json_schema_extra` that documents it as `schema`: what the API accepts, where a
    check of its own (with a clearer 400 than pydantic's) enforces it rather than the field's type."""

    def replace(field_schema: dict[str, Any]) -> None:
        kept = {k: field_schema[k] for k in ("title", "description", "default") if k in field_schema}
        field_schema.clear()
        field_schema.update(schema, **kept)

    return replace


def _accepted(name: str) -> str:
    return " or ".join(["null", *(json.dumps(v) for v in _NOOPS[name])])


def _unsupported(name: str, **constraints: Any) -> Any:
    doc = _documented({"anyOf": [*({"const": v} for v in _NOOPS[name]), {"type": "null"}]})
    return Field(None, description=f"Not supported: only {_accepted(name)} (a no-op) is accepted.",
                 json_schema_extra=doc, **constraints)


def _unsupported_given(body: BaseModel) -> str | None:
    """The first unsupported field given with a value that asks for something."""
    fields, extra = body.__dict__, body.model_extra or {}  # not getattr: a missing field costs a raise
    for name, noops in _NOOPS.items():
        value = fields[name] if name in fields else extra.get(name)
        # By type too: 0 == False, and logprobs 0 is a request while false is not.
        if value is not None and not any(type(value) is type(v) and value == v for v in noops):
            return name
    return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = Field(None, json_schema_extra=_documented({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"],  # text parts only
                                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
        {"type": "null"},
    ]}))

    _content_utf8 = field_validator("content")(_utf8)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # None when not given: the engine's default applies (e.g. the model's generation_config.json).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    # Engines take a 64-bit seed (SGLang's JSON encoder refuses a larger int: a 500).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = _unsupported("n", ge=1)
    # Strict: "yes" or 1 is a client's mistake, not a request to stream.
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Extension (as vLLM and SGLang): ignore EOS up to max_tokens, so benchmarks do fixed work.
    ignore_eos: StrictBool = False

    _text_utf8 = field_validator("model", "stop")(_utf8)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = _unsupported("logprobs")
    top_logprobs: int | None = _unsupported("top_logprobs", ge=0)
    tools: list[dict[str, Any]] | None = _unsupported("tools")
    tool_choice: str | dict[str, Any] | None = _unsupported("tool_choice")
    functions: list[dict[str, Any]] | None = _unsupported("functions")
    function_call: str | dict[str, Any] | None = _unsupported("function_call")
    response_format: dict[str, Any] | None = _unsupported("response_format")


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(json_schema_extra=_documented({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}, "description": "Token ids."},
    ]}))
    logprobs: StrictBool | int | None = _unsupported("logprobs")
    echo: StrictBool | None = _unsupported("echo")
    best_of: int | None = _unsupported("best_of", ge=1)
    suffix: str | None = _unsupported("suffix")

    _prompt_utf8 = field_validator("prompt")(_utf8_text)


# ---- responses, as the OpenAPI document describes them (the routes build plain dicts) ----------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the engine's prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] = Field("assistant", description="In the first chunk only.")
    content: str = Field("", description="Absent when the chunk has no text.")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="Empty in the last chunk with stream_options.include_usage.")
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null, and set in the last chunk.")


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice] = Field(description="Empty in the last chunk with stream_options.include_usage.")
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null, and set in the last chunk.")


def _completion_responses(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A completion route's 200 is JSON, or with `stream: true` server-sent events; then its errors."""
    # Before OpenAPI 3.2 a text/event-stream schema describes one event ({"data", "event", "id", "retry"}).
    data = {"type": "string", "anyOf": [
        {"const": "[DONE]", "description": "The end of the stream."},
        {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            chunk.model_json_schema(ref_template="#/components/schemas/{model}"),
            {"$ref": "#/components/schemas/ErrorResponse", "description": "The request failed after it started."},
        ]}},
    ]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    ok = {"model": model, "description": "The completion; with stream: true, server-sent events: a chunk per event, "
                                         "then `[DONE]`.",
          "content": {"text/event-stream": {"schema": event}}}
    return {200: ok, **error_responses(400, 404, 502, 503)}


def _text_content(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages", code="unsupported_content")
        parts.append(part["text"])
    return "".join(parts)


def build_router(app_state: Any, hot_routes: dict[str, HotRoute] | None = None) -> APIRouter:
    """`app_state` carries: settings, server, prompt_builder, cluster (see orchestrator.app).
    `hot_routes` is filled with the completion routes' handlers, for `orchestrator.hot_path`."""
    router = APIRouter()

    def check_supported(body: SamplingFields) -> None:
        name = _unsupported_given(body)
        if name is not None:
            raise APIError(400, f"{name} is not supported by this server (only {_accepted(name)} is accepted)",
                           param=name, code="unsupported_parameter")

    def check_model(model: str) -> None:
        served = app_state.served_models()
        if model not in served:
            raise APIError(404, f"model {model!r} does not exist; served: {', '.join(served)}",
                           param="model", code="model_not_found")

    def sampling_of(body: SamplingFields, prompt_len: int) -> SamplingParams:
        context = app_state.max_context
        if prompt_len >= context:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context is {context}",
                           param="messages", code="context_length_exceeded")
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and prompt_len + requested > context:
            raise APIError(400, f"prompt ({prompt_len}) + max_tokens ({requested}) exceeds the context "
                           f"length {context}", param="max_tokens", code="context_length_exceeded")
        max_tokens = requested or min(app_state.settings.default_max_tokens, context - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                              stop=stop, seed=body.seed, ignore_eos=body.ignore_eos)

    @router.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "tetri"} for m in app_state.served_models()
        ]}

    @router.post("/v1/chat/completions", response_model=None,
                 responses=_completion_responses(ChatCompletion, ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, request: Request):
        check_supported(body)
        check_model(body.model)
        messages = [{"role": m.role, "content": _text_content(m)} for m in body.messages]
        builder = app_state.prompt_builder(body.model)
        try:
            prompt_text, prompt_ids = builder.chat(messages)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        # OpenAI's id prefix for chat completions (Job's default is the text completions' cmpl-).
        job = Job(body.model, prompt_ids, sampling_of(body, len(prompt_ids)), prompt_text,
                  id=f"chatcmpl-{random.getrandbits(128):032x}")
        return await respond(job, body, request, chat=True)

    @router.post("/v1/completions", response_model=None,
                 responses=_completion_responses(TextCompletion, TextCompletionChunk))
    async def completions(body: CompletionRequest, request: Request):
        check_supported(body)
        check_model(body.model)
        builder = app_state.prompt_builder(body.model)
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            prompt_ids, prompt_text = builder.text_ids(body.prompt), body.prompt
        else:
            vocab = builder.vocab_size
            if not body.prompt or min(body.prompt) < 0 or max(body.prompt) >= vocab:
                raise APIError(400, f"prompt token ids must be non-empty and within [0, {vocab})", param="prompt")
            # Token ids: their text is decoded only if something reads it (the length predictor).
            prompt_ids, prompt_text = list(body.prompt), ""
        job = Job(body.model, prompt_ids, sampling_of(body, len(prompt_ids)), prompt_text,
                  detokenize=None if prompt_text else builder.tokenizer.decode)
        return await respond(job, body, request, chat=False)

    async def respond(job: Job, body: SamplingFields, request: Request, chat: bool):
        events = app_state.server.run(job)
        watch = ClientWatch(request.receive)
        if body.stream:
            # Wait for the first event before answering, so that "no capacity" is a real 503 and a
            # request that cannot run is a 4xx, not a broken stream; the same watch then covers the stream.
            try:
                first = await watch.run(_first(events))
            except BaseException:
                watch.stop()
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return SSEResponse(sse(job, first, events, chat, include_usage), watch)
        try:
            return await watch.run(collect(job, events, chat))
        finally:
            watch.stop()

    def usage(job: Job) -> dict[str, Any]:
        prompt = len(job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
                "total_tokens": prompt + job.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

    async def collect(job: Job, events: AsyncIterator[TokenEvent], chat: bool) -> dict[str, Any]:
        first = await _first(events)
        texts = [first.text]
        error = first.error
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    texts.append(event.text)
                    error = error or event.error
        except (Overloaded, BackendError) as exc:
            # Failed mid-way (e.g. its decode instance died) and no instance could continue it.
            raise _midway_failure(job, exc) from exc
        finally:
            metrics.COMPLETION_TOKENS.inc(job.completion_tokens)
        if job.finish_reason == "error":
            if job.completion_tokens == 0:
                raise APIError(502, error or "the engine failed", "server_error", code="backend_error")
            raise _midway_failure(job, BackendError(error or "the engine failed"))
        text = "".join(texts)
        finish = _finish(job.finish_reason)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": job.id, "object": "chat.completion" if chat else "text_completion",
                "created": int(job.arrival), "model": job.model, "choices": [choice], "usage": usage(job)}

    async def sse(job: Job, first: TokenEvent, events: AsyncIterator[TokenEvent], chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(job.arrival)
        # What every chunk shares, serialized once: a token costs one json.dumps of its text (the
        # layout is json.dumps's of {"id", "object", "created", "model", "choices": [choice], "usage"}).
        head = json.dumps({"id": job.id, "object": obj, "created": created, "model": job.model})[:-1]
        head = f'data: {head}, "choices": [{{"index": 0, '
        usage_none = ', "usage": null' if include_usage else ""
        tail_open = f', "finish_reason": null, "logprobs": null}}]{usage_none}}}\n\n'

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                role_part = '"role": "assistant"' if role else ""
                content = f'"content": {json.dumps(text)}' if text else ""
                body = f'"delta": {{{role_part}{", " if role_part and content else ""}{content}}}'
            else:
                body = f'"text": {json.dumps(text or "")}'
            if finish is None:
                return head + body + tail_open
            return f'{head}{body}, "finish_reason": {json.dumps(finish)}, "logprobs": null}}]{usage_none}}}\n\n'

        # The last chunk (the one with a finish reason) waits for the end of the stream, which follows
        # at once, and goes out in one write with the usage and [DONE]: one send, not three.
        last = ""
        try:
            async with contextlib.aclosing(events):
                if first.finish_reason is None:
                    yield chunk(first.text, None, role=True)
                else:
                    last = chunk(first.text, _finish(first.finish_reason), role=True)
                async for event in events:
                    if last:
                        yield last
                        last = ""
                    if event.error:
                        yield f"data: {json.dumps(error_body(event.error, 'server_error', code='backend_error'))}\n\n"
                    text = chunk(event.text, _finish(event.finish_reason))
                    if event.finish_reason is None:
                        yield text
                    else:
                        last = text
        except Exception as exc:  # noqa: BLE001 - the 200 is sent: any failure must end the stream properly
            if isinstance(exc, (Overloaded, BackendError)):
                err = _midway_failure(job, exc)
            else:
                log.exception("request %s: the stream failed", job.id)
                err = APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
            yield f"{last}data: {json.dumps(error_body(err.message, err.type, code=err.code))}\n\ndata: [DONE]\n\n"
            return
        finally:
            metrics.COMPLETION_TOKENS.inc(job.completion_tokens)
        if include_usage:
            payload = {"id": job.id, "object": obj, "created": created, "model": job.model, "choices": [],
                       "usage": usage(job)}
            last += f"data: {json.dumps(payload)}\n\n"
        yield last + "data: [DONE]\n\n"

    if hot_routes is not None:
        hot_routes["/v1/chat/completions"] = HotRoute(ChatCompletionRequest, chat)
        hot_routes["/v1/completions"] = HotRoute(CompletionRequest, completions)
    return router


async def _first(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return TokenEvent([], "", finish_reason="stop")
    except (Overloaded, BackendError) as exc:
        raise _refusal(exc) from exc


def _refusal(exc: Overloaded | BackendError) -> APIError:
    """Why a request could not start: 503 + Retry-After for load or an engine fault, the engine's
    4xx when it refused the request itself."""
    if isinstance(exc, Overloaded):
        return APIError(503, str(exc), "server_error", code="overloaded", retry_after=exc.retry_after)
    status = exc.status if 400 <= exc.status < 500 else 503
    return APIError(status, str(exc), "invalid_request_error" if status < 500 else "server_error",
                    code="backend_error", retry_after=None if status < 500 else 1.0)


def _midway_failure(job: Job, exc: Overloaded | BackendError) -> APIError:
    """A request that failed after it started (e.g. its decode instance died) and that no instance
    could continue: 503 + Retry-After, as for a request that could not start."""
    overloaded = isinstance(exc, Overloaded)
    return APIError(503, f"the request failed after {job.completion_tokens} tokens and no instance could continue "
                    f"it: {exc}", "server_error", code="overloaded" if overloaded else "backend_error",
                    retry_after=exc.retry_after if overloaded else 1.0)


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}.get(reason, reason)
