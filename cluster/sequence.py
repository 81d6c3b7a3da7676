"""A sequence: one of a request's n completions, as the scheduler and engine track it."""

import enum
from dataclasses import dataclass, field

from actors.sampling_params import SamplingParams
from cluster.kv_blocks import SeqBlocks


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache (first admission)
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    blocks_sent: int = 0  # how many of blocks.block_ids the workers already know
    needs_params: bool = True  # workers have not seen this sequence's params since (re)admission
    admitted_at: float | None = None  # first scheduled (queue time ends)
    last_token_at: float | None = None  # for the inter-token latency

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def forget_kv(self) -> None:
        """Back to waiting with nothing in the KV cache (preempted, or its workers replaced):
        the next admission recomputes its prompt and the tokens it produced as a prefill."""
        self.blocks = SeqBlocks()
        self.num_computed = 0
        self.blocks_sent = 0
        self.needs_params = True
        self.status = SeqStatus.WAITING
