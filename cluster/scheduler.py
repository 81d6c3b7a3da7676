"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (max_num_batched_tokens) and a sequence budget
(max_num_seqs). Running sequences go first: a decode costs one token, an unfinished
prompt its next chunk. Waiting sequences are then admitted in arrival order, first taking
what the prefix cache already holds, their prompt chunked to what is left of the budget.
When KV blocks run out, the newest running sequence is preempted: its blocks are freed and
it goes back to the head of the queue, to be recomputed later (its full blocks stay in the
prefix cache, so the recompute is often cheap). Nothing fails for lack of blocks unless a
single sequence cannot fit the whole cache, which the engine refuses up front.

Micro-batches. With pp pipeline stages the engine keeps up to pp steps in flight, one per
stage, and the batches are disjoint: a sequence in a step on the workers is neither
scheduled again (its next token, or its chunk's KV, is not back yet) nor preempted (that
step is writing its KV) until `update` takes the step back. A sequence short of blocks
whose victim, the newest, is in flight waits for it instead of preempting anyone else, so
the oldest running sequence always gets ahead, as with one batch. Each batch takes at most its
share, ceil(running / micro_batches), of the running sequences, oldest first, so the
batches in flight come out even and no stage waits on a lopsided one; what a batch leaves,
the next one takes. With micro_batches=1 the share is every running sequence.
"""

import time
from collections import deque
from dataclasses import dataclass

from actors.step_io import SampledToken
from cluster.kv_blocks import BlockManager
from cluster.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prefill_tokens_computed: int = 0
    prefix_queried_tokens: int = 0  # tokens of admitted sequences looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found there


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, micro_batches: int = 1):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs  # running sequences, in flight or not
        self.max_num_batched_tokens = max_num_batched_tokens  # per batch
        self.micro_batches = micro_batches  # batches in flight at once
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest (re)admission first
        self.in_flight: set[Sequence] = set()  # in a batch the workers have not returned yet
        self.released: list[int] = []  # seq ids the workers must forget at the next step
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """The next batch, in flight until `update` takes it back; empty when nothing can
        run before a batch in flight returns (or there is no work)."""
        budget = self.max_num_batched_tokens
        share = -(-len(self.running) // self.micro_batches)
        out: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0 or len(out) == share:
                break
            if seq.status is not SeqStatus.RUNNING or seq in self.in_flight:
                continue  # preempted below, while making room for an older sequence; or on the workers
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._allocate_or_preempt(seq, seq.num_computed + n):
                continue  # seq itself was preempted
            out.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            seq.num_computed = self.blocks.match_prefix(seq.blocks, seq.tokens)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self.blocks.allocate(seq.blocks, seq.num_computed + n) is None:
                # Wait for blocks holding nothing: a waiting sequence that kept its prefix
                # hits could starve the sequences requeued ahead of it (preempted ones) of
                # exactly those blocks. They stay cached, so the next try finds them again.
                self.blocks.release(seq.blocks)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            if self.blocks.enable_prefix_caching:
                self.stats.prefix_queried_tokens += seq.num_tokens
                self.stats.prefix_hit_tokens += seq.num_computed
            if seq.admitted_at is None:  # first admission, not a recompute after preemption
                seq.admitted_at = time.monotonic()
                seq.num_cached_prompt = seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        for s in out:
            if s.seq.num_computed < len(s.seq.prompt_ids):
                self.stats.prefill_tokens_computed += min(s.num_tokens, len(s.seq.prompt_ids) - s.seq.num_computed)
            self.in_flight.add(s.seq)
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest running sequences as needed.
        False when `seq` cannot run in this batch: it was the newest itself, and was
        preempted; or the newest is in flight (a step is writing its KV), and `seq` keeps
        what it holds and waits for that step to return."""
        while self.blocks.allocate(seq.blocks, num_tokens) is None:
            victim = self.running[-1]
            if victim in self.in_flight:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def update(self, batch: list[ScheduledSeq], tokens: list[SampledToken]) -> list[tuple[Sequence, SampledToken]]:
        """Account for a step that ran: its tokens are in the KV cache now, full blocks enter
        the prefix cache, its sequences may be scheduled again. Returns the sequences that
        sampled a token (prompt chunks short of the prompt's end sample none) with that
        token, minus those aborted meanwhile."""
        sampled = iter(tokens)
        out = []
        for s in batch:
            seq = s.seq
            self.in_flight.discard(seq)
            seq.num_computed += s.num_tokens
            if seq.num_computed < seq.num_tokens:
                continue
            token = next(sampled)
            if seq.is_finished:
                continue
            self.blocks.register_full_blocks(seq.blocks, seq.tokens, seq.num_computed)
            out.append((seq, token))
        return out

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.forget_kv()
        self.waiting.appendleft(seq)
        self.released.append(seq.seq_id)
        self.stats.preemptions += 1

    def adopt(self, old: "Scheduler") -> None:
        """Take over `old`'s unfinished sequences, whose KV died with its workers: the ones
        that ran first, in order, then those that waited; each is recomputed on admission."""
        for seq in [*old.running, *old.waiting]:
            seq.forget_kv()
            self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free a sequence's blocks (finished, aborted, or failed)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SeqStatus.FINISHED:
            self.blocks.release(seq.blocks)
            self.released.append(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def take_released(self) -> list[int]:
        released, self.released = self.released, []
        return released
