"""Prefix-aware request routing over the model replicas, on Ray Serve's request router API.

A replica that served a prompt keeps its KV blocks in its prefix cache (`cluster/kv_blocks.py`),
so a later prompt that starts with the same tokens skips their prefill there, and only there.
The router remembers, per full block of every prompt it routed, which replicas it sent it to,
keyed exactly as the engine keys its cache (`prefix_keys`: block i's key hashes its tokens and
block i-1's key). For a new prompt, replica r's match is the number of leading blocks of the
prompt r was sent:

    match(r) = max { m : key_1 .. key_m of the prompt were all routed to r }

It prefers the replica with the longest match, unless that replica is overloaded:

    load(r) = requests this router has in flight on r, or chose r for and is still routing
    prefer best = argmax match(r)   if match(best) > 0 and load(best) - min_r load(r) <= max_load_imbalance
    else        the least loaded replica (ties: the one that remembers the fewest blocks, so new
                prefixes spread out)

and hands Serve the rest, least loaded first, as fallbacks (Serve still skips a replica whose
queue is full). A request counts toward the load of the replica chosen for it from that
moment: Serve routes a burst of requests side by side, each waiting on a queue-length probe
before any of them is routed, and counting only routed ones sent a burst of new prompts to
one replica. A prompt with a holder is offered only that replica for its first
`HOLDER_ONLY_TRIES` routing attempts: Serve asks a replica its queue length with a deadline
(0.1 s, longer on retries), and under load a late answer would otherwise send the request to
a cold replica. What a router remembers is bounded (LRU over blocks), like the caches it mirrors;
a block the engine evicted meanwhile only costs a cache miss. With several ingress replicas each
has its own router and memory (Serve LLM's PrefixCacheAffinityRouter shares one tree in an actor,
at one remote call per request).
"""

import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from cluster.kv_blocks import prefix_keys

# Block keys remembered per router: 2^18 blocks of 16 tokens = 4M prompt tokens, ~50 MB.
DEFAULT_MAX_BLOCKS = 1 << 18
# Routing attempts that offer only the prefix holder before the other replicas join in.
HOLDER_ONLY_TRIES = 4
# A choice no routing attempt has renewed for this long stops counting as load (a request
# whose call failed before Serve reported it routed or completed; a waiting one renews it).
STALE_CHOICE_S = 60.0


@dataclass
class Routing:
    """A request this router is choosing a replica for: its prompt's block keys (hashed
    once), its tries, its current choice."""

    request: PendingRequest
    keys: list[int]
    tries: int
    choice: ReplicaID
    chosen_at: float  # time.monotonic()

    def stale(self, now: float) -> bool:
        future = self.request.future
        failed = future.done() and (future.cancelled() or future.exception() is not None)
        return failed or now - self.chosen_at > STALE_CHOICE_S


class PrefixAwareRouter(RequestRouter):
    """Serve's `request_router_class` for the engine deployment; `request_router_kwargs`
    go to `initialize_state`. Routing reads the `prompt_token_ids` keyword of `generate`
    calls; any other call goes to the least loaded replica."""

    def initialize_state(self, block_size: int = 16, max_load_imbalance: int = 8,
                         max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.block_size = block_size
        self.max_load_imbalance = max_load_imbalance
        self.max_blocks = max_blocks
        self.owners: OrderedDict[int, set[ReplicaID]] = OrderedDict()  # block key -> replicas, LRU order
        self.blocks_held: defaultdict[ReplicaID, int] = defaultdict(int)
        self.in_flight: dict[str, ReplicaID] = {}  # internal request id -> its replica
        self.load: defaultdict[ReplicaID, int] = defaultdict(int)  # requests in flight
        self.routing: dict[str, Routing] = {}  # internal request id -> its routing, until routed

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request_id = pending_request.metadata.internal_request_id if pending_request is not None else None
        previous = self.routing.pop(request_id, None)  # its own last choice is no load to weigh
        tries = previous.tries + 1 if previous is not None else 1
        keys = previous.keys if previous is not None else self._keys(pending_request)
        load = self._load()
        by_load = sorted(candidate_replicas, key=lambda r: (load[r.replica_id], self.blocks_held[r.replica_id]))
        best, matched = self._longest_match(keys, candidate_replicas, load)
        if matched > 0 and load[best.replica_id] - load[by_load[0].replica_id] <= self.max_load_imbalance:
            ranks = [[best]] if tries <= HOLDER_ONLY_TRIES else [[best], [r for r in by_load if r is not best]]
        else:
            ranks = [[by_load[0]], by_load[1:]]
        if pending_request is not None:
            self.routing[request_id] = Routing(pending_request, keys, tries, ranks[0][0].replica_id, time.monotonic())
        return ranks

    def _load(self) -> Counter[ReplicaID]:
        """Requests in flight per replica, plus those being routed to it: from its choice
        until the replica accepts it (`on_request_routed`) or the call ends; a request whose
        routing was cancelled or failed, or a stale choice, is dropped."""
        now = time.monotonic()
        self.routing = {i: r for i, r in self.routing.items() if not r.stale(now)}
        return Counter(self.load) + Counter(r.choice for r in self.routing.values())

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        routing = self.routing.pop(pending_request.metadata.internal_request_id, None)
        self.in_flight[pending_request.metadata.internal_request_id] = replica_id
        self.load[replica_id] += 1
        for key in routing.keys if routing is not None else self._keys(pending_request):
            owners = self.owners.setdefault(key, set())
            if replica_id not in owners:
                owners.add(replica_id)
                self.blocks_held[replica_id] += 1
            self.owners.move_to_end(key)
        while len(self.owners) > self.max_blocks:
            _, owners = self.owners.popitem(last=False)
            for r in owners:
                self.blocks_held[r] -= 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.routing.pop(internal_request_id, None)  # a call the replica rejected ends here too
        if (replica := self.in_flight.pop(internal_request_id, None)) is not None:
            self.load[replica] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self._replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._forget(replica_id)

    def _keys(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None or pending_request.metadata.call_method != "generate":
            return []
        prompt = pending_request.kwargs.get("prompt_token_ids") or []
        return list(prefix_keys(prompt, self.block_size))

    def _longest_match(self, keys: list[int], candidates: list[RunningReplica],
                       load: Counter[ReplicaID]) -> tuple[RunningReplica, int]:
        """The candidate that was sent the most leading blocks of `keys` (the least loaded
        of those that were), and how many."""
        alive = {r.replica_id: r for r in candidates}
        best, matched = candidates[0], 0
        for depth, key in enumerate(keys, start=1):
            holders = [alive[r] for r in self.owners.get(key, ()) if r in alive]
            if not holders:
                break
            best, matched = min(holders, key=lambda r: load[r.replica_id]), depth
            alive = {r.replica_id: r for r in holders}
        return best, matched

    def _forget(self, replica_id: ReplicaID) -> None:
        """A replica that is gone (and its cache with it)."""
        for owners in self.owners.values():
            owners.discard(replica_id)
        self.blocks_held.pop(replica_id, None)
        self.load.pop(replica_id, None)
        self.in_flight = {rid: r for rid, r in self.in_flight.items() if r != replica_id}
