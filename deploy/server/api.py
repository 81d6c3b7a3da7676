"""The OpenAI-compatible HTTP API over an `EngineClient`.

`build_api` is a pure function of its arguments (no module state): a Ray Serve replica builds
the app after it has built its engine (`__serve_build_asgi_app__`), tests build one per fake
engine. Every request is checked completely (types, model name, prompt length against
max_model_len, sampling ranges) before anything reaches the engine, and every engine request
is aborted if its client goes away first.
"""

import asyncio
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from jinja2 import TemplateError
from pydantic import BaseModel

from actors.sampling_params import ParamError, SamplingParams
from cluster.engine_client import CompletionDelta, EngineClient, EngineDeadError, RequestOutput, TokenLogprob
from deploy.server.errors import APIError, RequestGuard, install_error_handlers, model_not_found
from deploy.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeRequest,
    UsageInfo,
    now,
)
from deploy.server.streaming import collect, engine_outputs, stream_events, until_disconnect

HEALTH_TIMEOUT_S = 10.0


def build_api(
    engine: EngineClient,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The app for one engine. Under Ray Serve, build it in the replica once the engine exists
    (Ray Serve 2.60 calls `__serve_build_asgi_app__` after `__init__`):

        @serve.deployment
        @serve.ingress()
        class OpenAIServer:
            async def __init__(self, config): self.engine = ...
            def __serve_build_asgi_app__(self): return build_api(self.engine, served_model_name=...)
    """
    app = FastAPI(title="tensorfleet", summary=f"OpenAI-compatible API serving {served_model_name}")
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    api = _Frontend(engine, served_model_name)
    app.post("/v1/completions", response_model=None)(api.completions)
    app.post("/v1/chat/completions", response_model=None)(api.chat_completions)
    app.get("/v1/models")(api.models)
    app.get("/health")(api.health)
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)
    return app


class _Frontend:
    """The route handlers: validate, tokenize, run on the engine, shape the answer."""

    def __init__(self, engine: EngineClient, served_model_name: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model = served_model_name

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = self._tokenizer("prompt").encode(body.prompt)
        else:
            prompt_ids = self._check_token_ids(body.prompt, "prompt")
        params = body.to_sampling_params()
        self._check_request(params, len(prompt_ids), "prompt", "max_tokens")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = engine_outputs(self.engine, request_id, prompt_ids, params)
        k, created = params.logprobs, now()

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> BaseModel:
            return CompletionResponse(id=request_id, created=created, model=self.model, choices=choices,
                                      usage=usage)

        if body.stream:
            offsets = [0] * params.n  # text emitted so far per choice, for logprobs.text_offset

            def chunks(out: RequestOutput) -> Iterator[BaseModel]:
                for d in _visible(out.deltas):
                    logprobs = self._completion_logprobs(d.logprobs, k, offsets[d.index])
                    offsets[d.index] += len(d.text)
                    yield chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs,
                                                  finish_reason=d.finish_reason)])

            usage_chunk = (lambda u: chunk([], UsageInfo.from_engine(u))) if body.include_usage else None
            return await stream_events(request, outputs, [], chunks, usage_chunk)

        results, usage = await until_disconnect(request, collect(outputs, params.n))
        return _json(chunk(
            [CompletionChoice(index=i, text=r.text, logprobs=self._completion_logprobs(r.logprobs, k, 0),
                              finish_reason=r.finish_reason) for i, r in enumerate(results)],
            UsageInfo.from_engine(usage),
        ))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompt_ids = self._chat_prompt_ids(body.messages)
        params = body.to_sampling_params(max_model_len=self.engine.max_model_len, prompt_len=len(prompt_ids))
        self._check_request(params, len(prompt_ids), "messages", body.max_tokens_field)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = engine_outputs(self.engine, request_id, prompt_ids, params)
        k, created = params.logprobs, now()

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> BaseModel:
            return ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=choices,
                                       usage=usage)

        if body.stream:
            head = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                    for i in range(params.n)]

            def chunks(out: RequestOutput) -> Iterator[BaseModel]:
                for d in _visible(out.deltas):
                    yield chunk([ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text),
                                                 logprobs=self._chat_logprobs(d.logprobs, k),
                                                 finish_reason=d.finish_reason)])

            usage_chunk = (lambda u: chunk([], UsageInfo.from_engine(u))) if body.include_usage else None
            return await stream_events(request, outputs, head, chunks, usage_chunk)

        results, usage = await until_disconnect(request, collect(outputs, params.n))
        return _json(ChatCompletionResponse(
            id=request_id, created=created, model=self.model, usage=UsageInfo.from_engine(usage),
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text),
                                logprobs=self._chat_logprobs(r.logprobs, k), finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
        ))

    async def models(self) -> dict:
        card = {"id": self.model, "object": "model", "created": now(), "owned_by": "tensorfleet",
                "max_model_len": self.engine.max_model_len}
        return {"object": "list", "data": [card]}

    async def health(self) -> dict:
        try:
            await asyncio.wait_for(self.engine.check_health(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"the engine did not answer a health check within {HEALTH_TIMEOUT_S} s")
        return {"status": "ok"}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self._check_model(body.model)
        if body.messages is not None:
            tokens = self._chat_prompt_ids(body.messages)
        else:
            tokens = self._tokenizer("prompt").encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self._check_model(body.model)
        tokenizer = self._tokenizer("tokens")
        return {"prompt": tokenizer.decode(self._check_token_ids(body.tokens, "tokens"))}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise model_not_found(model, self.model)

    def _tokenizer(self, param: str):
        if self.tokenizer is None:
            raise ParamError(param, "this model is served without a tokenizer; send token ids")
        return self.tokenizer

    def _check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.engine.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ParamError(param, f"token ids must be in [0, {vocab}); got {bad[:5]}")
        return ids

    def _check_request(self, params: SamplingParams, prompt_len: int, prompt_field: str,
                       max_tokens_field: str) -> None:
        """Everything the engine would refuse, named after the fields the client sent."""
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise ParamError(prompt_field, f"the prompt is {prompt_len} tokens, which leaves no room "
                                           f"for a completion within max_model_len={limit}")
        self._check_token_ids(list(params.stop_token_ids), "stop_token_ids")
        try:
            params.validate(limit, prompt_len)
        except ParamError as exc:
            if exc.param != "max_tokens":
                raise
            raise ParamError(max_tokens_field, exc.message) from exc

    def _chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self._tokenizer("messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions "
                                "with a prompt instead", param="messages", code="no_chat_template")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise ParamError("messages", f"the chat template rejected the conversation: {exc}") from exc
        return tokenizer.encode(text, add_special_tokens=False)  # the template has the BOS

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _completion_logprobs(self, lps: list[TokenLogprob] | None, k: int | None, offset: int
                             ) -> CompletionLogprobs | None:
        return None if k is None else CompletionLogprobs.from_engine(lps or [], k, self._token_text, offset)

    def _chat_logprobs(self, lps: list[TokenLogprob] | None, k: int | None) -> ChatLogprobs | None:
        return None if k is None else ChatLogprobs.from_engine(lps or [], k, self._token_text)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _visible(deltas: list[CompletionDelta]) -> Iterator[CompletionDelta]:
    """Deltas worth a chunk: skip those whose text is all held back (and carry nothing else)."""
    return (d for d in deltas if d.text or d.finish_reason or d.logprobs)
