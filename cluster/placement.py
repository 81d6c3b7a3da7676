"""Placement of a replica's workers: one STRICT_PACK placement group per pipeline stage.

A stage's tp bundles (one GPU each, real or logical, plus a CPU; a CPU alone on a CPU-only
cluster) must land on one node, so its TP group's all-reduces never cross the network;
stages may land on different nodes, where only the activations between stages travel.
One actor per bundle; the driver addresses them as `workers[stage][tp_rank]`, global rank
`stage * tp + tp_rank` (the mesh `arange(pp * tp).reshape(pp, tp)`).

Every wait has a deadline: a layout the cluster cannot hold fails with what it needed and
what the cluster has, and leaves no placement group or actor behind. `check_room` asks the
same question up front, for a re-layout that must not touch the running workers unless
the new ones will fit once those are gone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The cluster cannot hold the layout; the message says what was needed and what is there."""


@dataclass
class WorkerGroup:
    """The actors of one replica, `workers[stage][tp_rank]`, and what they hold."""

    workers: list[list[ActorHandle]]
    node_ids: list[list[str]]  # as reported by each actor, same indexing as `workers`
    placement_groups: list[PlacementGroup]  # one per stage
    _alive: bool = field(default=True, repr=False)

    @property
    def alive(self) -> bool:
        """Still holding its workers and placement groups."""
        return self._alive

    @property
    def flat(self) -> list[ActorHandle]:
        """Workers in global-rank order r = stage * tp + tp_rank."""
        return [w for stage in self.workers for w in stage]

    def shutdown(self) -> None:
        """Kill the workers and give their resources back; safe to call twice."""
        if not self._alive:
            return
        self._alive = False
        _release(self.flat, self.placement_groups)


def place_workers(
    actor_cls: type | ActorClass,
    tp: int,
    pp: int,
    *,
    use_gpu: bool,
    timeout_s: float,
    make_args: Callable[[int, int], tuple[Any, ...]],
) -> WorkerGroup:
    """Reserve one node-local group of `tp` bundles per stage, then start one
    `actor_cls(*make_args(stage, tp_rank))` in each bundle.

    Returns once every worker has been constructed, or raises within `timeout_s`:
    `PlacementError` when the cluster cannot hold the layout or the workers do not start,
    the actor's own error when a constructor fails. Either way nothing is left behind.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1; got tp={tp}, pp={pp}")
    deadline = time.monotonic() + timeout_s
    bundle = rank_bundle(use_gpu)
    pgs = [placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK") for _ in range(pp)]
    workers: list[list[ActorHandle]] = []
    try:
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=pp, timeout=timeout_s)
        if len(ready) < pp:
            raise PlacementError(_cannot_hold(tp, pp, use_gpu, len(ready), timeout_s))
        remote_cls = actor_cls if isinstance(actor_cls, ActorClass) else ray.remote(actor_cls)
        for stage, pg in enumerate(pgs):
            workers.append([
                remote_cls.options(
                    num_cpus=1,
                    num_gpus=1 if use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=tp_rank
                    ),
                ).remote(*make_args(stage, tp_rank))
                for tp_rank in range(tp)
            ])
        # Asking each actor for its node also waits for its constructor to finish.
        refs = [w.__ray_call__.remote(_node_id) for stage in workers for w in stage]
        try:
            flat_ids = ray.get(refs, timeout=max(deadline - time.monotonic(), 0.0))
        except GetTimeoutError:
            raise PlacementError(
                f"the {tp * pp} workers (tp={tp} x pp={pp}) were placed but did not all "
                f"finish starting within {timeout_s:g} s; raise the placement timeout or "
                "check the worker logs for a slow or stuck constructor"
            ) from None
    except BaseException:
        _release([w for stage in workers for w in stage], pgs)
        raise
    node_ids = [flat_ids[s * tp : (s + 1) * tp] for s in range(pp)]
    return WorkerGroup(workers, node_ids, pgs)


def rank_bundle(use_gpu: bool) -> dict[str, float]:
    """What one worker's placement bundle reserves (a CPU alone on a CPU-only cluster)."""
    return {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}


def stages_that_fit(resources: dict[str, float], tp: int, bundle: dict[str, float]) -> int:
    """How many TP groups of `tp` bundles one node's `resources` hold."""
    return min(int(resources.get(k, 0) // (v * tp)) for k, v in bundle.items())


def check_room(tp: int, pp: int, *, use_gpu: bool, released: WorkerGroup | None = None) -> None:
    """Raise `PlacementError` unless `pp` stages of `tp` bundles, each stage on one node,
    fit in what the alive nodes have free now plus what `released` (the workers a re-layout
    replaces) still holds."""
    bundle = rank_bundle(use_gpu)
    free = {node: dict(res) for node, res in ray._private.state.available_resources_per_node().items()}
    held = released.node_ids if released is not None and released.alive else []
    for node in [n for stage in held for n in stage]:
        for resource, amount in bundle.items():
            free.setdefault(node, {})[resource] = free.get(node, {}).get(resource, 0) + amount
    stages = sum(stages_that_fit(res, tp, bundle) for res in free.values())
    if stages < pp:
        unit = "GPU" if use_gpu else "CPU"
        per_node = ", ".join(f"node {node[:8]}: {res.get(unit, 0):g}" for node, res in sorted(free.items()))
        raise PlacementError(
            f"cannot place tp={tp} x pp={pp}: it needs {pp} stage(s) of {tp} {unit}s on one node each, and the "
            f"cluster has room for {stages} (free {unit}s per node once this replica's workers are released: "
            f"{per_node or 'no alive nodes'}); choose a layout that fits, or free {unit}s or add nodes first"
        )


def rendezvous_address(rank0: ActorHandle, timeout_s: float = 60.0) -> str:
    """`tcp://ip:port` for `torch.distributed.init_process_group(init_method=...)`.

    Rank 0 hosts the TCP store, so the address must be one of rank 0's node's addresses
    (the IP Ray knows the node by: 127.0.0.1 on a simulated cluster) with a port free
    there; only rank 0 itself can find such a port.
    """
    try:
        ip, port = ray.get(rank0.__ray_call__.remote(_free_tcp_address), timeout=timeout_s)
    except GetTimeoutError:
        raise PlacementError(f"rank 0 did not report a rendezvous address within {timeout_s:g} s") from None
    host = f"[{ip}]" if ":" in ip else ip
    return f"tcp://{host}:{port}"


def _node_id(_actor: object) -> str:
    return ray.get_runtime_context().get_node_id()


def _free_tcp_address(_actor: object) -> tuple[str, int]:
    # The port is released again before torch binds it; nothing else on the node is
    # expected to grab it in between (the usual MASTER_PORT trade-off).
    ip = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


def _release(workers: list[ActorHandle], pgs: list[PlacementGroup]) -> None:
    for w in workers:
        ray.kill(w, no_restart=True)
    for pg in pgs:
        remove_placement_group(pg)


def _cannot_hold(tp: int, pp: int, use_gpu: bool, placed: int, timeout_s: float) -> str:
    """What was asked, what the cluster has, what to change. Called while the `placed`
    stage groups still hold their bundles, which count as free here."""
    unit = "GPU" if use_gpu else "CPU"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = "; ".join(
        f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]}): "
        f"{n['Resources'].get('GPU', 0):g} GPU, {n['Resources'].get('CPU', 0):g} CPU"
        for n in nodes
    ) or "no alive nodes"
    largest = max((n["Resources"].get(unit, 0) for n in nodes), default=0)
    stages_that_fit = sum(int(n["Resources"].get(unit, 0) // tp) for n in nodes)
    if tp > largest:
        advice = (
            f"a TP group must fit on one node and the largest has {largest:g} {unit}s: "
            f"use tensor_parallel_size <= {largest:g} and more pipeline stages"
        )
    elif stages_that_fit < pp:
        advice = (
            f"these nodes hold at most {stages_that_fit} stages of {tp} {unit}s: use "
            "fewer pipeline stages or add nodes"
        )
    else:
        free = ray.available_resources().get(unit, 0) + placed * tp
        advice = f"other work holds the {unit}s ({free:g} free): wait for it or add nodes"
    return (
        f"cannot place tp={tp} x pp={pp}: needs {pp} stage{'s' if pp > 1 else ''} x {tp} "
        f"{unit}s on one node each; only {placed} of {pp} stages were placed within "
        f"{timeout_s:g} s. Cluster nodes: {per_node}. To fix: {advice}"
    )
