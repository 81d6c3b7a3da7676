"""Scheduler against a plain-Python reference scheduler over the reference block pool of
test_kv_blocks: hand-worked schedules with every step's batch written out (chunks under a
token budget, the sequence cap, arrival order, prefix hits, preemption of the newest,
disjoint micro-batches in flight and their even shares), and seeded random workloads with
arrivals, aborts and up to 3 batches in flight, checked batch by batch."""

import random
from collections import deque

import pytest

from actors.sampling_params import SamplingParams
from actors.step_io import SampledToken
from cluster.kv_blocks import BlockManager
from cluster.scheduler import ScheduledSeq, Scheduler
from cluster.sequence import SeqStatus, Sequence
from tests.reference_scheduler import ReferenceScheduler
from tests.test_kv_blocks import ReferencePool, assert_same_state, random_prompt


def make_seq(seq_id: int, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(prompt), SamplingParams(max_tokens=max_tokens))


def token_at(seq_id: int, position: int) -> int:
    """The token a sequence samples at a position: a function of the position only, so a
    recompute after preemption samples the same one; 3 values, so outputs share blocks."""
    return (7 * seq_id + position) % 3


def expected_output(seq: Sequence) -> list[int]:
    return [token_at(seq.seq_id, len(seq.prompt_ids) + i) for i in range(seq.params.max_tokens)]


def finish_step(scheduler: Scheduler, batch: list[ScheduledSeq]) -> None:
    """A batch comes back: sample where a chunk reached the end, update, append, finish at
    max_tokens."""
    tokens = [SampledToken(token_at(s.seq.seq_id, s.seq.num_tokens)) for s in batch
              if s.seq.num_computed + s.num_tokens == s.seq.num_tokens]
    for seq, token in scheduler.update(batch, tokens):
        seq.output_ids.append(token.token_id)
        if len(seq.output_ids) >= seq.params.max_tokens:
            scheduler.finish(seq, "length")


def run_step(scheduler: Scheduler) -> list[ScheduledSeq]:
    """Schedule and "run" one batch: what the engine's step does around the scheduler."""
    batch = scheduler.schedule()
    finish_step(scheduler, batch)
    return batch


def run_table(scheduler: Scheduler, names: dict[int, str], max_steps: int = 100) -> tuple[list[str], list[str]]:
    """Run until no work is left, with up to `scheduler.micro_batches` batches in flight as
    the engine keeps them (fill the free slots, then take the oldest batch back); each
    batch as "A32 B1" in the order scheduled, and the ids released by the time each batch
    came back as "C"."""
    batches, released, in_flight = [], [], deque()
    while (scheduler.has_work() or in_flight) and len(batches) < max_steps:
        while len(in_flight) < scheduler.micro_batches and (batch := scheduler.schedule()):
            in_flight.append(batch)
            batches.append(" ".join(f"{names[s.seq.seq_id]}{s.num_tokens}" for s in batch))
        finish_step(scheduler, in_flight.popleft())
        released.append("".join(names[i] for i in scheduler.take_released()))
    return batches, released


def make_scheduler(specs: dict[str, tuple[int, int]], *, num_blocks: int = 64, block_size: int = 4,
                   max_num_seqs: int = 8, budget: int = 64, caching: bool = False, micro_batches: int = 1,
                   ) -> tuple[Scheduler, dict[str, Sequence], dict[int, str]]:
    """A scheduler with one sequence per name, added in order: name -> (prompt length,
    max_tokens); prompts of distinct tokens, so only what a test shares is shared."""
    scheduler = Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget, micro_batches)
    seqs = {}
    for i, (name, (length, max_tokens)) in enumerate(specs.items()):
        seqs[name] = make_seq(i, [1000 * (i + 1) + t for t in range(length)], max_tokens)
        scheduler.add(seqs[name])
    return scheduler, seqs, {s.seq_id: name for name, s in seqs.items()}


# -- hand-worked schedules (block_size 4) --------------------------------------------------


def test_long_prompts_are_chunked_to_a_32_token_budget():
    scheduler, seqs, names = make_scheduler({"A": (70, 3), "B": (20, 3), "C": (40, 3)}, budget=32)
    batches, _ = run_table(scheduler, names)
    assert batches == [
        "A32",
        "A32",
        "A6 B20 C6",  # A's last chunk samples; B fits whole; C gets what is left
        "A1 B1 C30",  # decodes first, then C's next chunk
        "A1 B1 C4",  # A and B reach 3 tokens
        "C1",
        "C1",
    ]
    assert scheduler.stats.prefill_tokens_computed == 70 + 20 + 40
    assert all(len(s.output_ids) == 3 and s.finish_reason == "length" for s in seqs.values())


def test_max_num_seqs_caps_the_running_set():
    scheduler, _, names = make_scheduler({"A": (3, 2), "B": (3, 2), "C": (3, 2)}, max_num_seqs=2)
    assert run_table(scheduler, names)[0] == ["A3 B3", "A1 B1", "C3", "C1"]


def test_admission_is_in_arrival_order_even_when_a_later_one_would_fit():
    # 4 blocks: A holds 2; B needs 3 and waits; C needs 1 and would fit, but waits behind B
    scheduler, _, names = make_scheduler({"A": (7, 2), "B": (10, 2), "C": (2, 2)}, num_blocks=4)
    assert run_table(scheduler, names)[0] == ["A7", "A1", "B10 C2", "B1 C1"]


def test_preemption_takes_the_newest_and_requeues_it_at_the_head():
    # 4 blocks of 4 tokens; each sequence needs 3 blocks (4 + 8 tokens) by its end
    scheduler, seqs, names = make_scheduler({"A": (4, 8), "B": (4, 8), "C": (4, 8)}, num_blocks=4)
    batches, released = run_table(scheduler, names)
    assert batches == [
        "A4 B4 C4",  # 3 blocks taken, 1 free
        "A1 B1",  # A takes the free block; B needs one: C, the newest, is preempted
        "A1 B1",
        "A1 B1",
        "A1 B1",  # A and B now hold 8 tokens in 2 blocks each
        "A1",  # A needs a third block: B is preempted (B now heads the queue, before C)
        "A1",
        "A1",  # A's 8th token: A finishes, its 3 blocks come free
        "B9",  # B recomputes its 4 prompt + 5 sampled tokens in one chunk; C does not fit
        "B1",
        "B1",
        "C5",  # C recomputes 4 + 1
        "C1", "C1", "C1", "C1", "C1", "C1",
    ]
    assert released == ["", "C", "", "", "", "B", "", "A", "", "", "B", "", "", "", "", "", "", "C"]
    assert scheduler.stats.preemptions == 2
    for s in seqs.values():  # nothing lost: every token is what its position samples
        assert s.output_ids == expected_output(s) and s.status is SeqStatus.FINISHED
    assert scheduler.blocks.num_free == 4


def test_two_micro_batches_take_turns():
    scheduler, seqs, names = make_scheduler({"A": (3, 3), "B": (3, 3), "C": (3, 3), "D": (3, 3)}, budget=6,
                                            micro_batches=2)
    batches, released = run_table(scheduler, names)
    assert batches == [
        "A3 B3",  # the budget holds two prompts
        "C3 D3",  # while A and B are in flight, the next two
        "A1 B1",  # A and B are back: their decodes
        "C1 D1",
        "A1 B1",
        "C1 D1",
    ]
    assert released == ["", "", "", "", "AB", "CD"]
    assert all(s.output_ids == expected_output(s) for s in seqs.values())


def test_micro_batches_even_out_to_a_share_of_the_running_sequences():
    scheduler, seqs, names = make_scheduler({n: (2, 4) for n in "ABCDE"}, budget=8, micro_batches=2)
    batches, _ = run_table(scheduler, names)
    assert batches == [
        "A2 B2 C2 D2",  # admission fills the budget
        "E2",
        "A1 B1 C1",  # 5 running: a batch takes at most 3, and leaves D for the next
        "D1 E1",
        "A1 B1 C1",
        "D1 E1",
        "A1 B1 C1",
        "D1 E1",
    ]
    assert all(s.output_ids == expected_output(s) for s in seqs.values())


def test_a_sequence_whose_victim_is_in_flight_waits_for_it():
    # 2 blocks of 4 tokens: A and B hold one each; each needs both by its end
    scheduler, seqs, names = make_scheduler({"A": (4, 4), "B": (4, 4)}, num_blocks=2, budget=4, micro_batches=2)
    batches, released = run_table(scheduler, names)
    assert batches == [
        "A4",
        "B4",  # A is back and needs a second block: B, the newest, is in flight, so A waits
        "A1",  # B is back: A preempts it
        "A1", "A1",  # A finishes
        "B4", "B1", "B1", "B1",  # B recomputes its prompt, then its token, then decodes
    ]
    assert released == ["", "", "B", "", "A", "", "", "", "B"]
    assert scheduler.stats.preemptions == 1
    assert all(s.output_ids == expected_output(s) for s in seqs.values())


def test_a_preempted_sequence_is_resent_whole():
    scheduler, seqs, _ = make_scheduler({"A": (4, 8), "B": (4, 8)}, num_blocks=2)
    for seq in seqs.values():
        seq.blocks_sent, seq.needs_params = 1, False  # what the engine records once it sent them
    run_step(scheduler)  # both prefill, 1 block each
    run_step(scheduler)  # A needs a second block: B is preempted
    b = seqs["B"]
    assert b.status is SeqStatus.WAITING and list(scheduler.waiting) == [b]
    assert (b.num_computed, b.blocks.block_ids, b.blocks_sent, b.needs_params) == (0, [], 0, True)
    assert len(b.output_ids) == 1  # its sampled token stays, to be recomputed


def test_admission_takes_prefix_cache_hits():
    scheduler, seqs, _ = make_scheduler({"A": (9, 3)}, num_blocks=8, caching=True)
    a = seqs["A"]
    run_step(scheduler)  # A's 9 prompt tokens: 2 full blocks enter the cache
    b = make_seq(1, a.prompt_ids[:8] + [7, 7, 7], 2)
    scheduler.add(b)
    batch = run_step(scheduler)
    assert [(s.seq, s.num_tokens) for s in batch] == [(a, 1), (b, 3)]  # A's decode, B's 3 uncached tokens
    assert b.num_cached_prompt == 8 and b.blocks.block_ids[:2] == a.blocks.block_ids[:2]
    assert [scheduler.blocks.blocks[i].ref_count for i in b.blocks.block_ids] == [2, 2, 1]
    assert scheduler.stats.prefill_tokens_computed == 9 + 3


def test_finish_frees_blocks_once_and_take_released_empties():
    scheduler, seqs, _ = make_scheduler({"A": (8, 4), "B": (9, 4)}, num_blocks=3, caching=True)
    run_step(scheduler)  # A runs (2 blocks); B needs 3 blocks and waits
    c = make_seq(2, seqs["A"].prompt_ids + [5], 4)  # shares A's 2 blocks, cached meanwhile
    scheduler.finish(seqs["B"], "abort")  # a waiting sequence leaves the queue
    scheduler.add(c)
    run_step(scheduler)  # A's decode takes the 3rd block; C finds its hit but no 3rd block
    assert c.status is SeqStatus.WAITING and c.num_computed == 0 and c.blocks.block_ids == []  # waits holding nothing
    assert [b.ref_count for b in scheduler.blocks.blocks] == [1, 1, 1]
    scheduler.finish(c, "abort")
    assert [b.ref_count for b in scheduler.blocks.blocks] == [1, 1, 1]
    scheduler.finish(seqs["A"], "abort")
    scheduler.finish(seqs["A"], "stop")  # again: nothing more to free or release
    assert scheduler.take_released() == [1, 2, 0] and scheduler.take_released() == []
    assert scheduler.blocks.num_free == 3 and not scheduler.has_work()
    assert seqs["A"].finish_reason == "stop" and not scheduler.running and not scheduler.waiting


def test_update_hands_each_sampled_token_to_its_own_sequence():
    scheduler, seqs, _ = make_scheduler({"B": (3, 4), "C": (3, 4), "A": (20, 4)}, budget=16)
    batch = scheduler.schedule()
    assert [s.num_tokens for s in batch] == [3, 3, 10]  # A's chunk stops short: it samples nothing
    scheduler.finish(seqs["B"], "abort")  # aborted while the step ran
    out = scheduler.update(batch, [SampledToken(11), SampledToken(22)])
    assert [(seq, t.token_id) for seq, t in out] == [(seqs["C"], 22)]
    assert [s.num_computed for s in seqs.values()] == [3, 3, 10]


def test_a_waiting_sequences_prefix_hold_does_not_deadlock():
    """4 blocks of 4 tokens. P leaves 2 cached blocks. R (5 + 11 tokens, the whole cache)
    runs; H (P's 8 tokens + 1) takes P's 2 blocks from the cache and finds no third block.
    Had H kept them while waiting, R, preempted for a third block and requeued ahead of H,
    could never fit again: a stall that found once kept both forever. Every request fits
    the cache alone, as the engine checks."""
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    p = make_seq(0, list(range(100, 109)), 1)
    r = make_seq(1, list(range(200, 205)), 11)
    h = make_seq(2, list(range(100, 108)) + [999], 1)
    scheduler.add(p)
    run_step(scheduler)  # P computes and finishes: blocks 0 and 1 stay cached
    scheduler.add(r)
    run_step(scheduler)
    scheduler.add(h)
    for _ in range(100):
        if not scheduler.has_work():
            break
        run_step(scheduler)
    assert r.is_finished and h.is_finished


# -- random workloads against the reference ------------------------------------------------


def check_invariants(scheduler: Scheduler, batch: list[ScheduledSeq], live: list[Sequence],
                     in_flight: deque[list[ScheduledSeq]]) -> None:
    assert sum(s.num_tokens for s in batch) <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert all(s.num_tokens > 0 for s in batch)
    flying = [s.seq.seq_id for b in [*in_flight, batch] for s in b]
    assert len(set(flying)) == len(flying), "a sequence is in two batches in flight"
    bs = scheduler.blocks.block_size
    for s in batch:
        assert s.seq.status is SeqStatus.RUNNING
        assert s.seq.num_computed + s.num_tokens <= s.seq.num_tokens
    for s in (s for b in [*in_flight, batch] for s in b if not s.seq.is_finished):  # never preempted in flight
        assert len(s.seq.blocks.block_ids) * bs >= s.seq.num_computed + s.num_tokens
    holders: dict[int, int] = {}
    for seq in live:
        for b in seq.blocks.block_ids:
            holders[b] = holders.get(b, 0) + 1
    assert {b.block_id: b.ref_count for b in scheduler.blocks.blocks if b.ref_count} == holders
    assert set(scheduler.running).isdisjoint(scheduler.waiting)
    assert {s.seq_id for s in [*scheduler.running, *scheduler.waiting]} == {s.seq_id for s in live}


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_match_the_reference_scheduler(seed, caching, micro_batches):
    """Each round either schedules a batch (a slot is free) or takes the oldest batch in
    flight back, at random; aborts come at any time, in flight or not."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    num_blocks = rng.randrange(4, 12)
    budget, max_num_seqs = rng.choice([1, 3, 8, 32]), rng.randrange(2, 6)
    capacity = num_blocks * block_size
    scheduler = Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget, micro_batches)
    ref = ReferenceScheduler(ReferencePool(num_blocks, block_size, caching), max_num_seqs, budget, micro_batches)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(0, capacity // 2))] for _ in range(3)]
    arrivals: dict[int, list[Sequence]] = {}
    for sid in range(rng.randrange(4, 12)):
        prompt = random_prompt(rng, stems, capacity)[: capacity - 1]
        seq = make_seq(sid, prompt, rng.randrange(1, capacity - len(prompt) + 1))  # fits the cache alone
        arrivals.setdefault(rng.randrange(8), []).append(seq)
    seqs = {s.seq_id: s for group in arrivals.values() for s in group}
    aborted = set()
    in_flight: deque[list[ScheduledSeq]] = deque()

    def abort(seq: Sequence) -> None:
        scheduler.finish(seq, "abort")
        ref.finish(seq.seq_id)
        aborted.add(seq.seq_id)

    for step in range(4000):
        for seq in arrivals.get(step, []):
            scheduler.add(seq)
            ref.add(seq.seq_id, seq.prompt_ids)
        live = [s for s in seqs.values() if s.status is not SeqStatus.FINISHED and s.seq_id in ref.tokens]
        if live and rng.random() < 0.02:  # in flight or not
            abort(rng.choice(live))
            live = [s for s in live if not s.is_finished]
        if len(in_flight) < micro_batches and (not in_flight or rng.random() < 0.6):
            batch = scheduler.schedule()
            assert [(s.seq.seq_id, s.num_tokens) for s in batch] == ref.schedule()
            check_invariants(scheduler, batch, live, in_flight)
            if batch:
                in_flight.append(batch)
        else:  # the oldest batch comes back
            batch = in_flight.popleft()
            tokens = [token_at(s.seq.seq_id, s.seq.num_tokens) for s in batch
                      if s.seq.num_computed + s.num_tokens == s.seq.num_tokens]
            sampled = scheduler.update(batch, [SampledToken(t) for t in tokens])
            ref_sampled = ref.update([(s.seq.seq_id, s.num_tokens) for s in batch], tokens)
            assert [(seq.seq_id, t.token_id) for seq, t in sampled] == ref_sampled
            for seq, token in sampled:
                seq.output_ids.append(token.token_id)
                ref.tokens[seq.seq_id].append(token.token_id)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    scheduler.finish(seq, "length")
                    ref.finish(seq.seq_id)
        assert scheduler.take_released() == ref.released
        ref.released = []
        assert [s.seq_id for s in scheduler.waiting] == ref.waiting
        assert [s.seq_id for s in scheduler.running] == ref.running
        assert {s.seq_id for s in scheduler.in_flight} == ref.in_flight
        assert {s.seq_id: s.num_computed for s in scheduler.running} == {i: ref.computed[i] for i in ref.running}
        assert scheduler.stats.preemptions == ref.preemptions
        assert (scheduler.stats.prefix_queried_tokens, scheduler.stats.prefix_hit_tokens) == (
            ref.prefix_queried, ref.prefix_hits)
        assert_same_state(scheduler.blocks, ref.pool, {i: s.blocks for i, s in seqs.items() if i in ref.tokens})
        if step >= max(arrivals) and not scheduler.has_work() and not in_flight:
            break
    assert not scheduler.has_work(), "some sequence never finished"
    for seq in seqs.values():
        if seq.seq_id not in aborted:
            assert seq.output_ids == expected_output(seq), "a token was lost or repeated"
