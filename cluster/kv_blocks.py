"""Paged KV-cache block manager (driver side), with automatic prefix caching.

One manager per replica hands out block ids; every worker uses the same ids for its own
layers and KV heads, so a block id means "these block_size token positions" everywhere.

Prefix caching: a full block is keyed by hash(parent block's key, its tokens), so a key
names the block's tokens *and everything before them*. A block whose sequence finished
keeps its key while it sits in the free queue; a new request whose prompt starts with the
same tokens takes it back instead of recomputing it. Allocation takes free blocks in LRU
order, evicting the least recently freed cached block first.
"""

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field


def block_key(parent: int | None, tokens: list[int]) -> int:
    """The prefix key of a full block: its tokens and, through `parent`, all before them."""
    return hash((parent, tuple(tokens)))


def prefix_keys(tokens: list[int], block_size: int) -> Iterator[int]:
    """The keys of the full blocks of `tokens`, in order: those `match_prefix` looks up
    (the request router keys replicas' caches by the same keys)."""
    parent = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_key(parent, tokens[start : start + block_size])
        yield parent


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # prefix key when full and registered in the cache


@dataclass
class SeqBlocks:
    """The blocks one sequence holds, and the keys of its full blocks so far."""

    block_ids: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix key -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: SeqBlocks, num_tokens: int) -> int:
        """New blocks a sequence needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def match_prefix(self, seq: SeqBlocks, tokens: list[int]) -> int:
        """Take cached blocks for the longest cached prefix of `tokens`; returns the number of
        tokens whose KV is already there. At least one token is always left to compute, so
        the step that follows produces logits for the last one."""
        if not self.enable_prefix_caching:
            return 0
        for key in prefix_keys(tokens[:-1], self.block_size):  # the last token is always computed
            block_id = self.cached.get(key)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_ids.append(block_id)
            seq.keys.append(key)
        return len(seq.block_ids) * self.block_size

    def allocate(self, seq: SeqBlocks, num_tokens: int) -> list[int] | None:
        """Grow `seq` to hold `num_tokens` tokens; the new block ids, or None (nothing
        taken) when not enough blocks are free."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return None
        new = []
        for _ in range(need):
            block_id, _ = self.free.popitem(last=False)  # least recently freed first
            block = self.blocks[block_id]
            if block.key is not None:  # evict it from the prefix cache
                del self.cached[block.key]
                block.key = None
            block.ref_count = 1
            new.append(block_id)
        seq.block_ids += new
        return new

    def register_full_blocks(self, seq: SeqBlocks, tokens: list[int], num_computed: int) -> None:
        """Key the blocks that `num_computed` tokens have filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.keys), num_computed // bs):
            parent = seq.keys[-1] if seq.keys else None
            key = block_key(parent, tokens[i * bs : (i + 1) * bs])
            seq.keys.append(key)
            block = self.blocks[seq.block_ids[i]]
            if key not in self.cached and block.key is None:
                block.key = key
                self.cached[key] = block.block_id

    def release(self, seq: SeqBlocks) -> None:
        """Drop a sequence's hold on its blocks; cached blocks stay reusable until evicted.
        Blocks go to the free queue tail in reverse order, so a sequence's last blocks
        (least likely to be shared) are evicted before its first."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_ids.clear()
        seq.keys.clear()

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
