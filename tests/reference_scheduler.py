"""The reference scheduler tests/test_scheduler.py checks `cluster.scheduler.Scheduler`
against: continuous batching as specified, in plain Python over sequence ids."""

import math

from tests.test_kv_blocks import ReferencePool


class ReferenceScheduler:
    """Continuous batching as specified, the slow obvious way, on sequence ids. Each step:
    running sequences, oldest (re)admission first, get their next chunk of what the budget
    leaves; when one's blocks do not fit, the newest running sequence is preempted (its
    blocks freed, back to the head of the queue) until they do, or until it was itself the
    newest. Then waiting sequences are admitted in queue order, while tokens and sequence
    slots are left: each first takes the prefix cache's hits; the first one whose chunk does
    not fit stops admission and gives its hits back (they stay cached). Prefix-cache lookups
    count once per admission.

    With k micro-batches: a sequence in a batch not yet returned is skipped and never a
    victim: a sequence whose victim (the newest running one) is in flight skips this batch,
    preempting nobody and keeping its blocks; and a batch takes at most ceil(running / k)
    running sequences, counted when the batch starts."""

    def __init__(self, pool: ReferencePool, max_num_seqs: int, max_num_batched_tokens: int, micro_batches: int = 1):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.micro_batches = micro_batches
        self.in_flight: set[int] = set()
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.waiting: list[int] = []  # head first
        self.running: list[int] = []  # oldest (re)admission first
        self.finished: set[int] = set()
        self.released: list[int] = []
        self.preemptions = 0
        self.prefix_queried = self.prefix_hits = 0

    def add(self, sid: int, prompt: list[int]) -> None:
        self.tokens[sid], self.computed[sid] = list(prompt), 0
        self.waiting.append(sid)

    def schedule(self) -> list[tuple[int, int]]:
        left, batch = self.budget, []
        share = math.ceil(len(self.running) / self.micro_batches)
        for sid in list(self.running):
            if sid not in self.running or sid in self.in_flight or left == 0 or len(batch) == share:
                continue
            n = min(len(self.tokens[sid]) - self.computed[sid], left)
            while self.pool.grow(sid, self.computed[sid] + n) is None:
                victim = self.running[-1]
                if victim in self.in_flight:
                    break
                self._preempt(victim)
                if victim == sid:
                    break
            else:
                batch.append((sid, n))
                left -= n
        while self.waiting and left > 0 and len(self.running) < self.max_num_seqs:
            sid = self.waiting[0]
            self.computed[sid] = self.pool.match(sid, self.tokens[sid])
            n = min(len(self.tokens[sid]) - self.computed[sid], left)
            if self.pool.grow(sid, self.computed[sid] + n) is None:
                self.pool.release(sid)
                self.computed[sid] = 0
                break
            if self.pool.caching:
                self.prefix_queried += len(self.tokens[sid])
                self.prefix_hits += self.computed[sid]
            self.running.append(self.waiting.pop(0))
            batch.append((sid, n))
            left -= n
        self.in_flight |= {sid for sid, _ in batch}
        return batch

    def _preempt(self, sid: int) -> None:
        self.running.remove(sid)
        self.pool.release(sid)
        self.computed[sid] = 0
        self.waiting.insert(0, sid)
        self.released.append(sid)
        self.preemptions += 1

    def update(self, batch: list[tuple[int, int]], tokens: list[int]) -> list[tuple[int, int]]:
        sampled, out = list(tokens), []
        for sid, n in batch:
            self.in_flight.discard(sid)
            self.computed[sid] += n
            if self.computed[sid] < len(self.tokens[sid]):
                continue
            token = sampled.pop(0)
            if sid in self.finished:
                continue
            self.pool.register(sid, self.tokens[sid], self.computed[sid])
            out.append((sid, token))
        return out

    def finish(self, sid: int) -> None:
        if sid in self.finished:
            return
        if sid in self.running:
            self.running.remove(sid)
        else:
            self.waiting.remove(sid)
        self.pool.release(sid)
        self.released.append(sid)
        self.finished.add(sid)
