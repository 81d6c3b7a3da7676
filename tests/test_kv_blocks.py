"""BlockManager against a plain-Python block pool: hand-worked cases with the numbers
written out, and seeded random operation sequences checked step by step (block ids handed
out, prefix hits, the free queue's order, reference counts, what the cache holds)."""

import random

import pytest

from cluster.kv_blocks import BlockManager, SeqBlocks


class ReferencePool:
    """The intended behaviour, the slow obvious way. `lru` lists the free blocks, the next
    to be handed out first; `owners[b]` the sequences holding block b; `prefix_of[b]` the
    whole token prefix that a cached block ends (a tuple, where the manager keeps a hash
    chain), so two blocks with the same tokens after different prefixes never match."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.block_size = block_size
        self.caching = caching
        self.lru = list(range(num_blocks))
        self.owners: dict[int, list[str]] = {b: [] for b in range(num_blocks)}
        self.prefix_of: dict[int, tuple[int, ...]] = {}
        self.held: dict[str, list[int]] = {}
        self.registered: dict[str, int] = {}  # full blocks of a sequence already keyed

    def _block_for(self, prefix: tuple[int, ...]) -> int | None:
        return next((b for b, p in self.prefix_of.items() if p == prefix), None)

    def match(self, name: str, tokens: list[int]) -> int:
        held = self.held.setdefault(name, [])
        assert not held, "a prefix is matched only by a sequence that holds nothing yet"
        if not self.caching:
            return 0
        for i in range((len(tokens) - 1) // self.block_size):  # full blocks before the last token
            b = self._block_for(tuple(tokens[: (i + 1) * self.block_size]))
            if b is None:
                break
            if b in self.lru:
                self.lru.remove(b)
            self.owners[b].append(name)
            held.append(b)
        self.registered[name] = len(held)
        return len(held) * self.block_size

    def grow(self, name: str, num_tokens: int) -> list[int] | None:
        held = self.held.setdefault(name, [])
        need = max(0, -(-num_tokens // self.block_size) - len(held))
        if need > len(self.lru):
            return None
        new, self.lru = self.lru[:need], self.lru[need:]
        for b in new:
            self.prefix_of.pop(b, None)
            self.owners[b] = [name]
        held += new
        return new

    def register(self, name: str, tokens: list[int], num_computed: int) -> None:
        if not self.caching:
            return
        for i in range(self.registered.get(name, 0), num_computed // self.block_size):
            prefix = tuple(tokens[: (i + 1) * self.block_size])
            b = self.held[name][i]
            if self._block_for(prefix) is None and b not in self.prefix_of:
                self.prefix_of[b] = prefix
            self.registered[name] = i + 1

    def release(self, name: str) -> None:
        for b in reversed(self.held.pop(name, [])):
            self.owners[b].remove(name)
            if not self.owners[b]:
                self.lru.append(b)
        self.registered.pop(name, None)

    def ref_counts(self) -> list[int]:
        return [len(self.owners[b]) for b in sorted(self.owners)]


def assert_same_state(bm: BlockManager, ref: ReferencePool, seqs: dict[str, SeqBlocks]) -> None:
    """The manager's observable state equals the reference's, and its invariants hold."""
    assert list(bm.free) == ref.lru
    assert [b.ref_count for b in bm.blocks] == ref.ref_counts()
    cached = {b.block_id for b in bm.blocks if b.key is not None}
    assert cached == set(bm.cached.values()) == set(ref.prefix_of)
    assert all(bm.blocks[b].key == k for k, b in bm.cached.items())
    assert {n: s.block_ids for n, s in seqs.items()} == {n: ref.held.get(n, []) for n in seqs}
    for name, seq in seqs.items():
        assert len(set(seq.block_ids)) == len(seq.block_ids), f"{name} holds a block twice"
    held = {b for s in seqs.values() for b in s.block_ids}
    assert held.isdisjoint(bm.free) and len(held) + bm.num_free == bm.num_blocks


# -- hand-worked cases (block_size 4) ------------------------------------------------------


def test_allocation_takes_free_blocks_in_order_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = SeqBlocks(), SeqBlocks()
    assert bm.blocks_needed(a, 10) == 3
    assert bm.allocate(a, 6) == [0, 1]
    assert bm.allocate(a, 8) == []  # 8 tokens still fit its 2 blocks
    assert bm.allocate(b, 5) is None  # needs 2, 1 is free: takes nothing
    assert b.block_ids == [] and bm.num_free == 1
    assert bm.allocate(a, 9) == [2] and a.block_ids == [0, 1, 2]
    assert bm.num_free == 0 and bm.usage() == 1.0


def test_release_frees_a_sequences_last_blocks_first():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = SeqBlocks(), SeqBlocks()
    bm.allocate(a, 12)
    bm.allocate(b, 4)
    bm.release(a)
    assert list(bm.free) == [4, 2, 1, 0]  # 4 was never used, then a's blocks last-first
    assert [blk.ref_count for blk in bm.blocks] == [0, 0, 0, 1, 0]
    assert a.block_ids == [] and a.keys == []


def test_prompt_sharing_two_full_blocks_takes_them_from_the_cache():
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt_a = list(range(100, 112))  # 3 full blocks
    a = SeqBlocks()
    assert bm.match_prefix(a, prompt_a) == 0
    bm.allocate(a, 12)
    bm.register_full_blocks(a, prompt_a, 12)
    assert len(bm.cached) == 3

    prompt_b = prompt_a[:8] + [7, 7, 7]  # the same first 2 blocks, then 3 other tokens
    b = SeqBlocks()
    assert bm.match_prefix(b, prompt_b) == 8
    assert b.block_ids == [0, 1] and b.keys == a.keys[:2]
    assert [blk.ref_count for blk in bm.blocks[:3]] == [2, 2, 1]
    assert bm.allocate(b, 11) == [3]

    bm.release(a)  # b still holds the shared blocks: only a's own block 2 is free
    assert list(bm.free) == [4, 5, 2]
    assert [blk.ref_count for blk in bm.blocks[:4]] == [1, 1, 0, 1]


@pytest.mark.parametrize("length, hit", [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)])
def test_match_prefix_leaves_at_least_one_token_to_compute(length, hit):
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(16))
    a = SeqBlocks()
    bm.allocate(a, 16)
    bm.register_full_blocks(a, tokens, 16)  # all 4 blocks cached
    b = SeqBlocks()
    assert bm.match_prefix(b, tokens[:length]) == hit
    assert b.block_ids == [0, 1, 2, 3][: hit // 4]


def test_a_key_names_the_whole_prefix_not_just_the_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    a = SeqBlocks()
    bm.allocate(a, 8)
    bm.register_full_blocks(a, x + y, 8)
    assert bm.match_prefix(SeqBlocks(), y + x + [0]) == 0  # y is cached, but after x
    assert bm.match_prefix(SeqBlocks(), x + x + [0]) == 4  # x hits, the second x does not
    assert bm.match_prefix(SeqBlocks(), x + y + [0]) == 8


def test_eviction_takes_the_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    x, y = [1, 1, 1, 1], [2, 2, 2, 2]
    a, b = SeqBlocks(), SeqBlocks()
    bm.allocate(a, 4)
    bm.register_full_blocks(a, x, 4)  # block 0 caches x
    bm.allocate(b, 4)
    bm.register_full_blocks(b, y, 4)  # block 1 caches y
    bm.release(a)
    bm.release(b)
    assert list(bm.free) == [2, 0, 1]
    c = SeqBlocks()
    assert bm.allocate(c, 8) == [2, 0]  # the never-used block, then x's (freed before y's)
    assert bm.match_prefix(SeqBlocks(), x + [0]) == 0  # x was evicted
    d = SeqBlocks()
    assert bm.match_prefix(d, y + [0]) == 4 and d.block_ids == [1]  # y survived
    assert list(bm.cached.values()) == [1] and bm.blocks[0].key is None


def test_register_keys_only_the_blocks_the_computed_tokens_filled():
    bm = BlockManager(num_blocks=5, block_size=4)
    tokens = list(range(14))
    a = SeqBlocks()
    bm.allocate(a, 14)
    bm.register_full_blocks(a, tokens, 7)
    assert len(a.keys) == 1 and set(bm.cached.values()) == {0}
    bm.register_full_blocks(a, tokens, 14)
    assert len(a.keys) == 3 and set(bm.cached.values()) == {0, 1, 2}
    # a second sequence computing the same blocks keys nothing twice: the first copy stays cached
    b = SeqBlocks()
    bm.allocate(b, 4)
    bm.register_full_blocks(b, tokens, 4)
    assert b.block_ids == [4] and len(b.keys) == 1 and bm.blocks[4].key is None and set(bm.cached.values()) == {0, 1, 2}


def test_a_shared_block_is_freed_by_its_last_owner_only():
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(9))
    owners = [SeqBlocks() for _ in range(3)]
    bm.allocate(owners[0], 9)
    bm.register_full_blocks(owners[0], tokens, 8)
    for s in owners[1:]:
        assert bm.match_prefix(s, tokens) == 8
    assert [blk.ref_count for blk in bm.blocks] == [3, 3, 1, 0]
    for count, s in zip([2, 1, 0], owners, strict=True):
        bm.release(s)
        assert bm.blocks[0].ref_count == bm.blocks[1].ref_count == count
    assert list(bm.free) == [3, 2, 1, 0] and bm.num_free == 4


def test_without_prefix_caching_nothing_is_cached():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    tokens = list(range(9))
    a = SeqBlocks()
    bm.allocate(a, 9)
    bm.register_full_blocks(a, tokens, 9)
    bm.release(a)
    assert bm.cached == {} and bm.match_prefix(SeqBlocks(), tokens) == 0


# -- random operation sequences against the reference -------------------------------------


def random_prompt(rng: random.Random, stems: list[list[int]], max_tail: int) -> list[int]:
    """A shared stem (so prefixes hit) and 1 to max_tail - 1 tokens over a 3-token vocabulary
    (so equal blocks after different prefixes are common)."""
    return list(rng.choice(stems)) + [rng.randrange(3) for _ in range(rng.randrange(1, max_tail))]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_random_operations_match_the_reference_pool(seed, caching):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    num_blocks = rng.randrange(6, 16)
    bm, ref = BlockManager(num_blocks, block_size, caching), ReferencePool(num_blocks, block_size, caching)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(0, 3 * block_size))] for _ in range(3)]
    seqs: dict[str, SeqBlocks] = {}
    tokens: dict[str, list[int]] = {}
    computed: dict[str, int] = {}
    hits = 0
    for step in range(400):
        op = rng.random()
        if op < 0.25 or not seqs:  # a new sequence takes what the cache has
            name = f"s{step}"
            seqs[name], tokens[name] = SeqBlocks(), random_prompt(rng, stems, 12)
            hit = bm.match_prefix(seqs[name], tokens[name])
            assert hit == ref.match(name, tokens[name]) and hit < len(tokens[name])
            computed[name] = hit
            hits += hit > 0
        elif op < 0.75:  # a step computes a chunk (or a decode token) of some sequence
            name = rng.choice(sorted(seqs))
            if computed[name] == len(tokens[name]):
                tokens[name].append(rng.randrange(3))  # the token it sampled
            target = min(len(tokens[name]), computed[name] + rng.randrange(1, 3 * block_size))
            new = bm.allocate(seqs[name], target)
            assert new == ref.grow(name, target)
            if new is not None:
                computed[name] = target
                bm.register_full_blocks(seqs[name], tokens[name], target)
                ref.register(name, tokens[name], target)
        else:  # a sequence finishes (or is preempted)
            name = rng.choice(sorted(seqs))
            bm.release(seqs.pop(name))
            ref.release(name)
        assert_same_state(bm, ref, seqs)
    if caching:
        assert hits > 0, "the workload never exercised the prefix cache"
