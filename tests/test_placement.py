"""Ray placement on a simulated 2-node x 2-logical-GPU cluster: TP groups stay inside a
node, pipeline stages spread across nodes, gloo collectives work across the simulated
nodes through the rendezvous, and impossible layouts fail fast, clearly, leaving nothing."""

import time
from datetime import timedelta

import pytest
import ray
import torch
import torch.distributed as dist

from cluster.config import TensorfleetConfig
from cluster.placement import PlacementError, WorkerGroup, check_room, place_workers, rendezvous_address
from cluster.plan import PlanError
from cluster.replica import plan_replica
from cluster.verify import verify

pytestmark = pytest.mark.slow

TP, PP = 2, 2


class RankProbe:
    """A stand-in worker: says where it runs, and talks gloo with its peers over the
    TP group (a row of the rank mesh) and the PP edge (a column)."""

    def __init__(self, stage: int, tp_rank: int, tp: int, pp: int):
        self.stage, self.tp_rank, self.tp, self.pp = stage, tp_rank, tp, pp
        self.rank = stage * tp + tp_rank

    def where(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]

    def init_groups(self, init_method: str) -> None:
        dist.init_process_group(
            "gloo", init_method=init_method, rank=self.rank,
            world_size=self.tp * self.pp, timeout=timedelta(seconds=60),
        )
        mesh = torch.arange(self.pp * self.tp).reshape(self.pp, self.tp)
        # new_group is collective: every rank creates every stage's group, in one order.
        groups = [dist.new_group(row.tolist()) for row in mesh]
        self.tp_group = groups[self.stage]

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=self.tp_group)
        return x

    def send_to_next_stage(self, x: torch.Tensor) -> None:
        dist.send(x, dst=self.rank + self.tp)

    def recv_from_previous_stage(self, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.empty(shape)
        dist.recv(x, src=self.rank - self.tp)
        return x


def live_placement_groups() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def place_probes(tp: int, pp: int, timeout_s: float) -> WorkerGroup:
    return place_workers(
        RankProbe, tp, pp, use_gpu=True, timeout_s=timeout_s,
        make_args=lambda stage, tp_rank: (stage, tp_rank, tp, pp),
    )


@pytest.fixture(scope="class")
def probes(ray_cluster_2x2):
    group = place_probes(TP, PP, timeout_s=120)
    init_method = rendezvous_address(group.workers[0][0])
    ray.get([w.init_groups.remote(init_method) for w in group.flat], timeout=120)
    yield group
    group.shutdown()


class TestTwoStagesOfTwo:
    """tp=2 x pp=2 on 2 nodes x 2 GPUs; the group lives for this class only, so the
    tests after it find the cluster empty."""

    def test_tp_groups_stay_on_one_node_and_stages_spread(self, probes):
        where = [[ray.get(w.where.remote()) for w in stage] for stage in probes.workers]
        nodes = [[node for node, _ in stage] for stage in where]
        assert nodes == probes.node_ids
        assert nodes[0][0] == nodes[0][1] and nodes[1][0] == nodes[1][1]
        assert nodes[0][0] != nodes[1][0]
        # Ray's own record of the bundles agrees with what the actors report.
        for stage, pg in enumerate(probes.placement_groups):
            bundles = ray.util.placement_group_table(pg)["bundles_to_node_id"]
            assert [bundles[r] for r in range(TP)] == nodes[stage]
        # One logical GPU each, distinct within a node.
        for stage in where:
            gpus = [ids for _, ids in stage]
            assert all(len(ids) == 1 for ids in gpus) and gpus[0] != gpus[1]

    def test_rendezvous_is_on_loopback(self, probes):
        address = rendezvous_address(probes.flat[0])
        assert address.startswith("tcp://127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0

    def test_tp_all_reduce_and_pp_send_recv_across_nodes(self, probes):
        xs = [[torch.randn(5, 3) for _ in stage] for stage in probes.workers]
        sums = ray.get([w.tp_all_reduce.remote(xs[s][r])
                        for s, stage in enumerate(probes.workers) for r, w in enumerate(stage)], timeout=60)
        for s in range(PP):
            expected = xs[s][0] + xs[s][1]  # the TP group sums its own stage only
            for r in range(TP):
                torch.testing.assert_close(sums[s * TP + r], expected)

        sent = ray.get([w.send_to_next_stage.remote(xs[0][r]) for r, w in enumerate(probes.workers[0])]
                       + [w.recv_from_previous_stage.remote((5, 3)) for w in probes.workers[1]], timeout=60)
        for r in range(TP):
            torch.testing.assert_close(sent[TP + r], xs[0][r])


@pytest.mark.parametrize(
    "tp,pp,needed,advice",
    [
        (2, 3, "needs 3 stages x 2 GPUs on one node each", "hold at most 2 stages of 2 GPUs"),
        (4, 1, "needs 1 stage x 4 GPUs on one node each", "use tensor_parallel_size <= 2"),
    ],
    ids=["tp2xpp3", "tp4"],
)
def test_layout_larger_than_cluster_fails_within_deadline(ray_cluster_2x2, tp, pp, needed, advice):
    before = live_placement_groups()
    start = time.monotonic()
    with pytest.raises(PlacementError) as e:
        place_probes(tp, pp, timeout_s=5)
    elapsed = time.monotonic() - start
    message = str(e.value)
    assert elapsed < 10, f"refused only after {elapsed:.1f}s"
    assert needed in message and advice in message
    assert message.count("127.0.0.1 (node ") == 2 and "2 GPU, 4 CPU" in message
    assert live_placement_groups() == before


def test_shutdown_kills_workers_and_removes_groups(ray_cluster_2x2):
    group = place_probes(2, 1, timeout_s=60)
    pg_ids = {pg.id.hex() for pg in group.placement_groups}
    group.shutdown()
    group.shutdown()  # idempotent
    table = ray.util.placement_group_table()
    assert all(table[pg_id]["state"] == "REMOVED" for pg_id in pg_ids)
    for w in group.flat:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(w.where.remote(), timeout=30)


def test_check_room_counts_free_bundles_and_what_a_relayout_releases(ray_cluster_2x2):
    """With tp=2 x pp=1 holding one node, tp=2 x pp=2 has room only once those workers are
    released; tp=1 x pp=2 fits on the other node as it is."""
    group = place_probes(2, 1, timeout_s=60)
    try:
        deadline = time.monotonic() + 10  # the cluster's resource view catches up with the placement
        while True:
            try:
                check_room(2, 2, use_gpu=True)
            except PlacementError as e:
                message = str(e)
                break
            assert time.monotonic() < deadline, "check_room did not see the placed group"
            time.sleep(0.1)
        assert "cannot place tp=2 x pp=2" in message and "room for 1" in message
        check_room(2, 2, use_gpu=True, released=group)
        check_room(1, 2, use_gpu=True)
    finally:
        group.shutdown()


def config(path, tp, pp, partition=None) -> TensorfleetConfig:
    return TensorfleetConfig.model_validate({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                     "layer_partition": partition, "device": "cpu"},
        "engine": {"max_model_len": 256, "block_size": 8, "num_kv_blocks": 32},
    })


def test_tp4_refused_by_planner_on_2_gpu_nodes(ray_cluster_2x2, tiny_llama_dir):
    with pytest.raises(PlanError, match="tensor_parallel_size=4.*2 GPUs per node"):
        plan_replica(config(tiny_llama_dir[0], 4, 1))


@pytest.mark.parametrize("tp,pp,partition", [(2, 2, [3, 2]), (1, 3, [1, 3, 1])], ids=["tp2xpp2", "pp3-uneven"])
def test_verify_matches_hugging_face(ray_cluster_2x2, tiny_llama_dir, tp, pp, partition):
    result = verify(config(tiny_llama_dir[0], tp, pp, partition))
    print(f"tp={tp} pp={pp} {partition}: max relative error {result.max_error:.2e} in {result.seconds:.1f}s")
    assert result.ok and result.max_error < 1e-4
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
