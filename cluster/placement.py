"""Placement of a replica's workers: one STRICT_PACK placement group per pipeline stage.

A stage's tp bundles (one GPU each, real or logical; plain CPU on a CPU-only cluster)
must land on one node, so its TP group's all-reduces never cross the network; stages may
land on different nodes, where only the activations between stages travel. Workers are
addressed as `workers[stage][tp_rank]`, global rank stage * tp + tp_rank.

Waiting for resources has a deadline: a layout the cluster cannot hold fails with what it
needed and what the cluster has, and leaves nothing behind.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The cluster cannot hold the layout; the message says what was needed and what is there."""


@dataclass
class WorkerGroup:
    workers: list[list[ActorHandle]]  # [stage][tp_rank]
    node_ids: list[list[str]]  # the node each worker's bundle was placed on
    placement_groups: list[PlacementGroup]
    _alive: bool = field(default=True, repr=False)

    @property
    def flat(self) -> list[ActorHandle]:
        """Workers in global-rank order."""
        return [w for stage in self.workers for w in stage]

    def shutdown(self) -> None:
        """Kill the workers and remove the placement groups; safe to call twice."""
        if not self._alive:
            return
        self._alive = False
        for w in self.flat:
            ray.kill(w, no_restart=True)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def describe_cluster() -> str:
    rows = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = node["Resources"]
            rows.append(f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}): "
                        f"{res.get('GPU', 0):g} GPU, {res.get('CPU', 0):g} CPU")
    return "; ".join(rows) or "no alive nodes"


def place_workers(
    actor_cls: type,
    tp: int,
    pp: int,
    *,
    use_gpu: bool,
    timeout_s: float,
    make_args: Callable[[int, int], tuple],
) -> WorkerGroup:
    """Reserve a node-local bundle group per stage, then start one `actor_cls(*make_args(stage,
    tp_rank))` per bundle."""
    bundle = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    pgs = [placement_group([dict(bundle)] * tp, strategy="STRICT_PACK", name=f"tensorfleet-stage{s}")
           for s in range(pp)]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=pp, timeout=timeout_s)
    if len(ready) < pp:
        for pg in pgs:
            remove_placement_group(pg)
        unit = "GPUs" if use_gpu else "CPUs"
        raise PlacementError(
            f"the cluster cannot hold {pp} pipeline stage(s) x {tp} {unit} on one node each "
            f"(waited {timeout_s:g}s); the cluster has: {describe_cluster()}. Lower "
            "tensor_parallel_size to fit a node, or add nodes"
        )
    remote_cls = ray.remote(actor_cls)
    workers, node_ids = [], []
    for stage, pg in enumerate(pgs):
        bundle_nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        node_ids.append([bundle_nodes[r] for r in range(tp)])
        workers.append([
            remote_cls.options(
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(*make_args(stage, r))
            for r in range(tp)
        ])
    return WorkerGroup(workers, node_ids, pgs)


def rendezvous_address(rank0: ActorHandle, timeout_s: float = 60.0) -> str:
    """`tcp://ip:port` on rank 0's node (a port free there) for torch.distributed."""
    return ray.get(rank0.rendezvous_address.remote(), timeout=timeout_s)
