"""What the driver sends to every worker for one step, what a stage hands the next, and
what comes back.

Compact by design: a sequence brings only its new token ids, its first new position and
the KV blocks it gained since the last step (and, when (re)scheduled, its params and, if
the sampler needs them, the tokens a prefix-cache hit skipped). Workers keep each running
sequence's block table until the driver says it is finished or preempted. Stage s returns
a `StageHandoff` that stage s + 1's call for the same step takes as its argument (the
hidden states themselves go over the PP edge); TP rank 0 of the last stage returns the
`StepOutput`. This module and `actors.sampling_params` are the wire format between driver
and workers: they import nothing above them.
"""

from dataclasses import dataclass, field

from actors.sampling_params import SamplingParams


@dataclass(frozen=True)
class SeqStep:
    seq_id: int
    token_ids: list[int]  # new tokens this step (a prompt chunk, or the last sampled token)
    start_pos: int  # position of token_ids[0]; tokens before it are already in the KV cache
    new_blocks: list[int]  # KV blocks appended to this sequence's table since the last step
    sample: bool  # False for a prompt chunk that does not reach the end of the prompt
    params: SamplingParams | None = None  # sent when the sequence is (re)scheduled
    output_index: int = 0  # tokens generated so far: seeds the per-token random draw
    # With params, for a sampler that needs the whole history (penalties, a grammar): the
    # tokens before start_pos, which a prefix-cache hit means no step ever carries.
    prefix_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepInput:
    step_id: int
    seqs: list[SeqStep]
    released: list[int] = field(default_factory=list)  # sequences finished or preempted


@dataclass(frozen=True)
class StageHandoff:
    """Stage s is done with step `step_id`: its hidden states are on their way to stage
    s + 1 over the PP edge. `busy_s` carries how long each stage so far worked on the step
    (its TP rank of this column of the mesh), stage 0 first."""

    step_id: int
    busy_s: tuple[float, ...]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    tokens: list[SampledToken]  # one per sequence with sample=True, in StepInput order
    stage_busy_s: tuple[float, ...] = ()  # seconds each stage worked on this step, stage 0 first


@dataclass(frozen=True)
class RankStats:
    """One rank's running totals, for the metrics and the benchmarks.

    forward_s is model compute, all-reduces included, time spent waiting on the previous
    stage excluded; all_reduce_s / forward_s is this rank's all-reduce share."""

    stage: int
    tp_rank: int
    steps: int
    forward_s: float
    all_reduces: int
    all_reduce_s: float
    p2p_s: float
    weight_bytes: int
    kv_cache_bytes: int
    peak_memory_bytes: int
