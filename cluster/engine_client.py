"""The interface the HTTP layer depends on, so it can be tested with a fake engine.

`cluster.engine.Engine` implements it over real TP x PP workers; tests implement it with a
few lines that need no model.
"""

from collections.abc import AsyncIterator
from typing import Any, Protocol

from cluster.outputs import RequestOutput
from cluster.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine's workers are gone or stuck; in-flight requests fail with this (HTTP 503)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face tokenizer (encode/decode/chat template)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its deltas until it finishes.

        Raises `ParamError` at once for a request that can never run (prompt longer than
        max_model_len); closing the iterator early aborts the request and frees its blocks.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Return when every worker answers; raise `EngineDeadError` otherwise."""
        ...
