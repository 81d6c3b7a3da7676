"""Ray placement on a simulated 2-node x 2-GPU cluster: TP groups stay inside a node,
pipeline stages spread across nodes, and impossible layouts fail fast and clearly."""

import time

import pytest
import ray

from cluster.config import TensorfleetConfig
from cluster.placement import PlacementError, place_workers
from cluster.plan import PlanError
from cluster.replica import worker_spec
from cluster.verify import verify

pytestmark = pytest.mark.slow


class Probe:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def config(path, tp, pp, partition=None) -> TensorfleetConfig:
    return TensorfleetConfig.model_validate({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                     "layer_partition": partition, "device": "cpu"},
        "engine": {"max_model_len": 256, "block_size": 8, "num_kv_blocks": 32},
    })


def test_tp_group_on_one_node_stages_on_different_nodes(ray_cluster_2x2):
    group = place_workers(Probe, 2, 2, use_gpu=True, timeout_s=30, make_args=lambda s, r: ())
    try:
        actor_nodes = [[ray.get(w.node_id.remote()) for w in stage] for stage in group.workers]
        assert actor_nodes == group.node_ids
        assert actor_nodes[0][0] == actor_nodes[0][1]
        assert actor_nodes[1][0] == actor_nodes[1][1]
        assert actor_nodes[0][0] != actor_nodes[1][0]
    finally:
        group.shutdown()
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_layout_larger_than_cluster_fails_within_deadline(ray_cluster_2x2):
    start = time.perf_counter()
    with pytest.raises(PlacementError) as e:
        place_workers(Probe, 2, 3, use_gpu=True, timeout_s=5, make_args=lambda s, r: ())
    elapsed = time.perf_counter() - start
    print(f"refused after {elapsed:.1f}s: {e.value}")
    assert elapsed < 15
    assert "3 pipeline stage(s) x 2 GPUs" in str(e.value) and "2 GPU" in str(e.value)
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_tp4_refused_by_planner_on_2_gpu_nodes(ray_cluster_2x2, tiny_llama_dir):
    with pytest.raises(PlanError, match="tensor_parallel_size=4.*2 GPUs per node"):
        worker_spec(config(tiny_llama_dir[0], 4, 1))


@pytest.mark.parametrize("tp,pp,partition", [(2, 2, [3, 2]), (1, 3, [1, 3, 1])], ids=["tp2xpp2", "pp3-uneven"])
def test_verify_matches_hugging_face(ray_cluster_2x2, tiny_llama_dir, tp, pp, partition):
    result = verify(config(tiny_llama_dir[0], tp, pp, partition))
    print(f"tp={tp} pp={pp} {partition}: max relative error {result.max_error:.2e} in {result.seconds:.1f}s")
    assert result.ok and result.max_error < 1e-4
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
