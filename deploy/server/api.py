"""The OpenAI-compatible HTTP API over an `EngineClient`.

`build_api` is a pure function of its arguments (no module state): a Ray Serve replica builds
the app after it has built its engine (`__serve_build_asgi_app__`), tests build one per fake
engine. Every request is checked completely (types, model name, prompt length against
max_model_len, sampling ranges, token ids against the vocabulary, grammars) before anything
reaches the engine, and every engine request is aborted if its client goes away first.
"""

import asyncio
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from actors.sampling_params import ParamError, SamplingParams
from cluster.engine_client import CompletionDelta, EngineClient, EngineDeadError, RequestOutput, TokenLogprob
from deploy.server import tools
from deploy.server.errors import APIError, RequestGuard, install_error_handlers, model_not_found
from deploy.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from deploy.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
    now,
)
from deploy.server.streaming import collect, engine_outputs, stream_events, until_disconnect
from deploy.server.tool_parser import ToolCallParser

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
    app.get("/metrics", response_model=None)(api.metrics)
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
        """One choice per prompt and completion: choice i * n + j is prompt i's j-th."""
        self._check_model(body.model)
        prompts = [self._tokenizer("prompt").encode(p) if isinstance(p, str) else self._check_token_ids(p, "prompt")
                   for p in body.prompt]
        # grammars are built and checked off the event loop, which also runs the engine's steps
        structured = await asyncio.to_thread(body.output_grammar)
        if structured is not None:
            self._tokenizer(structured[1])  # the sampling rank masks tokens by their text
        params = body.to_sampling_params(structured[0] if structured else None)
        for ids in prompts:
            self._check_request(params, len(ids), "prompt", "max_tokens")
        echoes = ([p if isinstance(p, str) else self._tokenizer("echo").decode(p) for p in body.prompt]
                  if body.echo else [""] * len(prompts))
        echo = [echoes[i // params.n] for i in range(len(prompts) * params.n)]  # per choice
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = engine_outputs(self.engine, request_id, prompts, params)
        k, created = params.logprobs, now()

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> BaseModel:
            return CompletionResponse(id=request_id, created=created, model=self.model, choices=choices,
                                      usage=usage)

        if body.stream:
            offsets = [0] * len(echo)  # text emitted so far per choice, for logprobs.text_offset

            def chunks(out: RequestOutput) -> Iterator[BaseModel]:
                for d in _visible(out.deltas):
                    logprobs = self._completion_logprobs(d.logprobs, k, offsets[d.index])
                    offsets[d.index] += len(d.text)
                    yield chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs,
                                                  finish_reason=d.finish_reason)])

            head = [chunk([CompletionChoice(index=i, text=text)]) for i, text in enumerate(echo) if text]
            usage_chunk = (lambda u: chunk([], UsageInfo.from_engine(u))) if body.include_usage else None
            return await stream_events(request, outputs, head, chunks, usage_chunk)

        results, usage = await until_disconnect(request, collect(outputs, len(echo)))
        return _json(chunk(
            [CompletionChoice(index=i, text=echo[i] + r.text, logprobs=self._completion_logprobs(r.logprobs, k, 0),
                              finish_reason=r.finish_reason) for i, r in enumerate(results)],
            UsageInfo.from_engine(usage),
        ))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        offered = body.tools if body.tool_mode != "none" else []
        prompt_ids = self._chat_prompt_ids(body.messages, offered)
        tool_grammar = await asyncio.to_thread(tools.tool_grammar, offered, body.tool_mode, body.parallel_tool_calls)
        if (structured := await asyncio.to_thread(body.output_grammar)) is not None and tool_grammar is not None:
            raise ParamError(structured[1], "cannot be combined with tools unless tool_choice is 'none'")
        grammar = tool_grammar if tool_grammar is not None else structured[0] if structured else None
        params = body.to_sampling_params(max_model_len=self.engine.max_model_len, prompt_len=len(prompt_ids),
                                         grammar=grammar)
        self._check_request(params, len(prompt_ids), "messages", body.max_tokens_field)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = engine_outputs(self.engine, request_id, [prompt_ids], params)
        k, created = params.logprobs, now()
        parsers = [ToolCallParser() if tool_grammar is not None else None for _ in range(params.n)]

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> BaseModel:
            return ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=choices,
                                       usage=usage)

        if body.stream:
            head = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                    for i in range(params.n)]

            def chunks(out: RequestOutput) -> Iterator[BaseModel]:
                for d in _visible(out.deltas):
                    delta, reason = ChatDelta(content=d.text), d.finish_reason
                    if (parser := parsers[d.index]) is not None:
                        delta, reason = _parsed_delta(parser, d)
                        if delta is None and reason is None and not d.logprobs:
                            continue
                    yield chunk([ChatChunkChoice(index=d.index, delta=delta or ChatDelta(),
                                                 logprobs=self._chat_logprobs(d.logprobs, k), finish_reason=reason)])

            usage_chunk = (lambda u: chunk([], UsageInfo.from_engine(u))) if body.include_usage else None
            return await stream_events(request, outputs, head, chunks, usage_chunk)

        results, usage = await until_disconnect(request, collect(outputs, params.n))
        choices = []
        for i, r in enumerate(results):
            message, reason = ChatResponseMessage(content=r.text), r.finish_reason
            if (parser := parsers[i]) is not None:
                parser.feed(r.text)
                parser.finish()
                message = ChatResponseMessage(content=parser.content.strip() or None, tool_calls=parser.calls or None)
                reason = _tool_finish_reason(parser, reason)
            choices.append(ChatChoice(index=i, message=message, logprobs=self._chat_logprobs(r.logprobs, k),
                                      finish_reason=reason))
        return _json(ChatCompletionResponse(id=request_id, created=created, model=self.model,
                                            usage=UsageInfo.from_engine(usage), choices=choices))

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

    async def metrics(self) -> Response:
        """The engine's metrics in Prometheus text format (the names Ray's agents export)."""
        return Response(await self.engine.prometheus_metrics(), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self._check_model(body.model)
        if body.messages is not None:
            tokens = self._chat_prompt_ids(body.messages, [])
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
        params.check_token_ids(self.engine.vocab_size)
        try:
            params.validate(limit, prompt_len)
        except ParamError as exc:
            if exc.param != "max_tokens":
                raise
            raise ParamError(max_tokens_field, exc.message) from exc

    def _chat_prompt_ids(self, messages: list[ChatMessage], offered: list[ChatTool]) -> list[int]:
        tokenizer = self._tokenizer("messages")
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions "
                                "with a prompt instead", param="messages", code="no_chat_template")
        conversation, tools_arg = tools.conversation(messages, offered, tools.template_renders_tools(template))
        try:
            text = tokenizer.apply_chat_template(conversation, tools=tools_arg, add_generation_prompt=True,
                                                 tokenize=False)
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


def _parsed_delta(parser: ToolCallParser, d: CompletionDelta) -> tuple[ChatDelta | None, str | None]:
    """A completion delta through its choice's tool-call parser: (the chat delta, or None if
    nothing can be said yet; the finish reason)."""
    content, calls = parser.feed(d.text)
    if d.finish_reason is not None:
        more_content, more_calls = parser.finish()
        content, calls = content + more_content, calls + more_calls
    delta = ChatDelta(content=content or None, tool_calls=calls or None) if content or calls else None
    return delta, _tool_finish_reason(parser, d.finish_reason)


def _tool_finish_reason(parser: ToolCallParser, reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" and parser.calls else reason


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _visible(deltas: list[CompletionDelta]) -> Iterator[CompletionDelta]:
    """Deltas worth a chunk: skip those whose text is all held back (and carry nothing else)."""
    return (d for d in deltas if d.text or d.finish_reason or d.logprobs)
