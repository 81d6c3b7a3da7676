"""`tensorfleet doctor`: each judgment on hand-made facts (no cluster), the parsing of
`nvidia-smi` output captured on real machines, and the whole doctor on the simulated 2x2
cluster: every check ok on a healthy one, the right node and fix on a broken one, and
`serve` stopping on the same rows. The two-host failures are in tests/test_two_hosts.py."""

import dataclasses

import pytest
import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.collective_probe import LinkTiming, RankTimings, Site
from cluster.doctor import Report, format_report
from cluster.doctor_checks import (
    FAIL,
    OK,
    WARN,
    Check,
    NodeResources,
    auth_rows,
    cuda_rows,
    memory_rows,
    model_rows,
    placement_rows,
    version_rows,
)
from cluster.doctor_links import collective_rows, interface_rows, reachability_row
from cluster.interconnect import GPU_LINKS, gpu_group_expectation, judge, network_expectation, parse_topology
from cluster.node_facts import (
    Gpu,
    ModelFiles,
    NodeFacts,
    SocketInterface,
    parse_driver_cuda,
    parse_gpu_listing,
    resolve_ifname,
)
from deploy.cli.main import main
from tests.doctor_table import comparable, parse_table

# `nvidia-smi topo -m` of an 8 x H100 SXM node (tab-separated, NICs after the GPUs).
DGX_TOPO = (
    "\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    + "".join(
        f"GPU{i}\t" + "\t".join(" X " if j == i else "NV18" for j in range(8))
        + ("\tPIX\tSYS\t0-55,112-167\t0\t\tN/A\n" if i < 4 else "\tSYS\tPIX\t56-111,168-223\t1\t\tN/A\n")
        for i in range(8))
    + "NIC0\tPIX\tPIX\tPIX\tPIX\tSYS\tSYS\tSYS\tSYS\t X \tSYS\n"
    "\nLegend:\n\n  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n\nNIC Legend:\n\n  NIC0: mlx5_0\n  NIC1: mlx5_1\n"
)
# An 8-GPU PCIe server of an older driver (space-aligned, one NIC column), as pasted in
# kubernetes/kubernetes#53497.
PCIE_TOPO = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    mlx4_0  CPU Affinity
GPU0     X      PIX     PHB     PHB     SYS     SYS     SYS     SYS     PHB     0-9,20-29
GPU1    PIX      X      PHB     PHB     SYS     SYS     SYS     SYS     PHB     0-9,20-29
GPU2    PHB     PHB      X      PIX     SYS     SYS     SYS     SYS     PHB     0-9,20-29
GPU3    PHB     PHB     PIX      X      SYS     SYS     SYS     SYS     PHB     0-9,20-29
GPU4    SYS     SYS     SYS     SYS      X      PIX     PHB     PHB     SYS     10-19,30-39
GPU5    SYS     SYS     SYS     SYS     PIX      X      PHB     PHB     SYS     10-19,30-39
GPU6    SYS     SYS     SYS     SYS     PHB     PHB      X      PIX     SYS     10-19,30-39
GPU7    SYS     SYS     SYS     SYS     PHB     PHB     PIX      X      SYS     10-19,30-39
mlx4_0  PHB     PHB     PHB     PHB     SYS     SYS     SYS     SYS      X

Legend:

  X   = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PIX  = Connection traversing a single PCIe switch
"""
# Four NVLink-bridged pairs (0-1, 2-3, 4-5, 6-7) on two sockets.
PAIRS_TOPO = "\t" + "\t".join(f"GPU{j}" for j in range(8)) + "\tCPU Affinity\n" + "".join(
    f"GPU{i}\t" + "\t".join(" X " if i == j else "NV4" if i // 2 == j // 2 else "NODE" if i // 4 == j // 4 else "SYS"
                            for j in range(8)) + "\t0-31\n" for i in range(8))


def test_topology_parses_captured_nvidia_smi_output():
    dgx = parse_topology(DGX_TOPO)
    assert len(dgx) == 8 * 7 and set(dgx.values()) == {"NV18"}
    pcie = parse_topology(PCIE_TOPO)
    assert len(pcie) == 8 * 7
    assert pcie[(0, 1)] == "PIX" and pcie[(1, 3)] == "PHB" and pcie[(3, 4)] == "SYS" and pcie[(7, 6)] == "PIX"
    assert parse_topology("nvidia-smi: command not found") == {}


def test_a_tp_group_across_nvlink_islands_is_named():
    expected, why = gpu_group_expectation(PAIRS_TOPO, [2, 5])
    assert expected == GPU_LINKS["NV"] and why == "GPUs 2 and 5 are linked through the CPU (SYS)"
    within, sentence = judge("stage 1's TP all-reduce", 850, 9.5, expected, why)
    assert not within
    assert sentence == ("stage 1's TP all-reduce 850 µs, 9.50 GB/s; expected < 30 µs and > 100 GB/s on NVLink; "
                        "GPUs 2 and 5 are linked through the CPU (SYS)")
    assert gpu_group_expectation(PAIRS_TOPO, [4, 5]) == (GPU_LINKS["NV"], None)
    assert gpu_group_expectation(DGX_TOPO, list(range(8))) == (GPU_LINKS["NV"], None)
    # A PCIe server is judged as PCIe: its best link is one PCIe bridge.
    expected, why = gpu_group_expectation(PCIE_TOPO, [0, 4])
    assert expected == GPU_LINKS["PIX"] and why == "GPUs 0 and 4 are linked through the CPU (SYS)"
    assert judge("stage 0's TP all-reduce", 20, 150, GPU_LINKS["NV"], None)[0]


def test_network_expectation_is_a_share_of_the_line_rate():
    e = network_expectation("eth0", 100_000)
    assert e.link == "TCP over eth0 at 100 Gb/s" and e.min_gbps == pytest.approx(1.25) and e.max_latency_us is None
    assert network_expectation("eth0", None).min_gbps is None
    within, sentence = judge("stage 0 -> 1 send/recv (one way)", 400, 0.11, e, None)
    assert not within and "expected > 1.25 GB/s on TCP over eth0 at 100 Gb/s" in sentence


@pytest.mark.parametrize("setting,picked", [
    ("eth1", "eth1"), ("ens", "ens5f0"), ("=ens", None), ("=ens5f0", "ens5f0"), ("docker0,eth", "docker0"),
    ("^lo,docker", "eth1"), ("ib", None),
])
def test_socket_ifname_settings_resolve_like_nccl(setting, picked):
    assert resolve_ifname(setting, ["lo", "docker0", "eth1", "ens5f0"]) == picked


def test_nvidia_smi_listing_and_banner_parse():
    gpus, driver = parse_gpu_listing("0, NVIDIA H100 80GB HBM3, 81559, 80992, 570.86.15\n"
                                     "1, NVIDIA H100 80GB HBM3, 81559, 1024, 570.86.15\n")
    assert driver == "570.86.15" and [g.index for g in gpus] == [0, 1]
    assert gpus[1].free_bytes == 1024 << 20 and gpus[0].total_bytes == 81559 << 20
    banner = "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8     |"
    assert parse_driver_cuda(banner) == "12.8" and parse_driver_cuda("") is None


def facts(**changes) -> NodeFacts:
    base = NodeFacts(
        node_ip="10.0.0.2", hostname="b", hostname_address="10.0.0.2",
        versions={"python": "3.11.7", "torch": "2.13.0", "ray": "2.60.0", "transformers": "5.24.0",
                  "tensorfleet": "0.1.0 (source 3f2a9c1e7b04)"},
        torch_cuda=None, driver=None, driver_cuda=None, gpus=(), topology=None,
        ram_available_bytes=64 << 30, interfaces={"lo": "127.0.0.1", "eth0": "10.0.0.2"},
        socket=SocketInterface("GLOO_SOCKET_IFNAME", "eth0", False, "eth0", "10.0.0.2", 10_000),
        auth_mode="token", token_fingerprint="abc123abc123",
        model=ModelFiles("/models/m", {"config.json": 700, "model.safetensors": 1 << 20}, None),
        slower_transport_env={},
    )
    return dataclasses.replace(base, **changes)


H100 = Gpu(0, "NVIDIA H100 80GB HBM3", 80 << 30, 79 << 30)


def test_placement_names_the_node_whose_gpus_are_held():
    gpu = {"GPU": 1, "CPU": 1}
    nodes = [NodeResources("10.0.0.1", {"GPU": 2, "CPU": 4}, {"GPU": 2, "CPU": 4}),
             NodeResources("10.0.0.2", {"GPU": 2, "CPU": 4}, {"GPU": 1, "CPU": 4}),
             NodeResources("10.0.0.9", {"CPU": 8}, {"CPU": 8})]  # a CPU head holds no stage
    rows, fits = placement_rows(2, 2, gpu, nodes)
    assert not fits
    assert [(r.node, r.result) for r in rows] == [("10.0.0.1", OK), ("10.0.0.2", FAIL), ("10.0.0.9", OK),
                                                  ("cluster", FAIL)]
    assert "1 of 2 GPUs free" in rows[1].detail and "ray list actors" in rows[1].fix
    rows, fits = placement_rows(2, 1, gpu, nodes)  # one stage fits on the first node
    assert fits and all(r.result == OK for r in rows)


def test_versions_differing_from_the_driver_fail_on_that_node():
    driver = facts().versions
    drifted = {**driver, "torch": "2.12.0", "tensorfleet": "0.1.0 (source 000000000000)"}
    rows = version_rows("10.0.0.1", driver, {"10.0.0.1 stage 0": driver, "10.0.0.2 stage 1": drifted})
    assert [r.result for r in rows] == [OK, FAIL]
    assert rows[1].detail.startswith("torch 2.12.0 here, 2.13.0 on the driver (10.0.0.1)")
    assert "pip install torch==2.13.0" in rows[1].fix and "tensorfleet checkout" in rows[1].fix


def test_cuda_rows():
    gpu_node = facts(gpus=(H100,), driver="535.54", driver_cuda="12.2")
    rows = cuda_rows({"cpu-torch": gpu_node, "too-new": dataclasses.replace(gpu_node, torch_cuda="12.8"),
                      "good": dataclasses.replace(gpu_node, torch_cuda="12.1"), "no-gpu": facts()}, "cuda")
    assert [r.result for r in rows] == [FAIL, FAIL, OK, FAIL]
    assert "CPU build" in rows[0].detail and "newer than the driver supports" in rows[1].detail
    assert cuda_rows({"gpus": gpu_node}, "cpu")[0].result == WARN


def test_memory_against_the_plan():
    busy = dataclasses.replace(H100, index=1, free_bytes=3 << 30)
    node = facts(gpus=(H100, busy))
    rows = memory_rows({"n": node}, {"n": [("0.0", 60 << 30, 0), ("0.1", 60 << 30, 1)]})
    assert rows[0].result == FAIL and rows[0].detail == "GPU 1 has 3.00 GiB free, rank 0.1 needs 60.00 GiB"
    # Not placed yet: the freest GPUs are assumed.
    assert memory_rows({"n": node}, {"n": [("of a stage", 60 << 30, None)]})[0].result == OK
    assert memory_rows({"n": facts(ram_available_bytes=1 << 30)}, {"n": [("0.0", 2 << 30, None)]})[0].result == FAIL


def test_model_files_missing_or_different():
    reference = facts().model.sizes
    missing = facts(model=ModelFiles("/models/m", {}, "/models/m does not exist on this node"))
    short = facts(model=ModelFiles("/models/m", {"config.json": 700, "model.safetensors": 4096}, None))
    rows = model_rows(reference, {"a": facts(), "b": missing, "c": short})
    assert [r.result for r in rows] == [OK, FAIL, FAIL]
    assert "copy the model to /models/m on b" in rows[1].fix
    assert "model.safetensors is 4,096 bytes here, 1,048,576 on the reference copy" in rows[2].detail


def test_interfaces():
    lo = SocketInterface("GLOO_SOCKET_IFNAME", "lo", True, "lo", "127.0.0.1", None)
    typo = SocketInterface("NCCL_SOCKET_IFNAME", "eht0", True, None, None, None)
    unset = SocketInterface("GLOO_SOCKET_IFNAME", None, False, None, None, None)
    nodes = {"ok": facts(), "lo": facts(socket=lo), "typo": facts(socket=typo),
             "fallback": facts(socket=unset, hostname_address="127.0.1.1")}
    rows = interface_rows(nodes, spans_hosts=True)
    assert [r.result for r in rows] == [OK, FAIL, FAIL, FAIL]
    assert rows[0].detail == "gloo binds eth0 (10.0.0.2), the interface of the Ray node IP"
    assert "loopback" in rows[1].detail and "unset it" in rows[1].fix and "eth0 holds the Ray node IP" in rows[1].fix
    assert rows[2].detail == "NCCL_SOCKET_IFNAME=eht0 matches no interface here (it has lo, eth0)"
    assert "127.0.1.1" in rows[3].detail
    # One host (a simulated cluster): loopback is fine.
    assert interface_rows({"lo": facts(socket=lo)}, spans_hosts=False)[0].result == OK


def test_reachability_row_says_where_and_how_to_fix():
    pinned = SocketInterface("GLOO_SOCKET_IFNAME", "eth1", True, "eth1", "10.9.0.2", None)
    a = facts(node_ip="10.0.0.1", interfaces={"eth0": "10.0.0.1"},
              socket=SocketInterface("GLOO_SOCKET_IFNAME", "eth0", False, "eth0", "10.0.0.1", None))
    b = facts(socket=pinned, interfaces={"eth0": "10.0.0.2", "eth1": "10.9.0.2"})
    row = reachability_row("10.0.0.1 stage 0", a, "10.0.0.2 stage 1", b, "10.9.0.2", 4242, "No route to host")
    assert row.result == FAIL and row.node == "10.0.0.2 stage 1"
    assert row.detail == ("TCP from 10.0.0.1 stage 0 (10.0.0.1) to 10.9.0.2:4242 (eth1, from "
                          "GLOO_SOCKET_IFNAME=eth1): No route to host")
    assert row.fix.startswith("let 10.0.0.1 and 10.9.0.2 reach each other over TCP")
    assert "or on 10.0.0.2 stage 1: set GLOO_SOCKET_IFNAME to an interface the other nodes reach (eth0 holds " \
           "the Ray node IP 10.0.0.2), or unset it" in row.fix
    # The other way round, the pinned interface is the source's: that is where to change it.
    back = reachability_row("10.0.0.2 stage 1", b, "10.0.0.1 stage 0", a, "10.0.0.1", 4343, "no answer within 2 s")
    assert "or on 10.0.0.2 stage 1: set GLOO_SOCKET_IFNAME" in back.fix and "on 10.0.0.1" not in back.fix
    assert reachability_row("x", a, "y", b, "10.9.0.2", 1, None).result == OK


def test_collective_rows_judge_each_link_against_its_interconnect():
    node = facts(gpus=(H100,) * 8, topology=PAIRS_TOPO)
    other = facts(node_ip="10.0.0.3", socket=SocketInterface("NCCL_SOCKET_IFNAME", "eth0", False, "eth0",
                                                             "10.0.0.3", 100_000))
    sites = [[Site("n1", (2,)), Site("n1", (5,))], [Site("n2", (0,)), Site("n2", (1,))]]
    timings = [RankTimings(0, 0, LinkTiming(850, 9.5, "nccl"), LinkTiming(40, 0.1, "nccl")),
               RankTimings(0, 1, LinkTiming(800, 9.8, "nccl"), None),
               RankTimings(1, 0, LinkTiming(12, 180, "nccl"), None), RankTimings(1, 1, LinkTiming(11, 190, "nccl"), None)]
    rows = collective_rows(["n1 stage 0", "n2 stage 1"], sites, timings,
                           [node, dataclasses.replace(other, gpus=(H100,) * 8, topology=PAIRS_TOPO)], "cuda")
    assert [(r.check, r.node, r.result) for r in rows] == [
        ("tp all-reduce", "n1 stage 0", WARN), ("tp all-reduce", "n2 stage 1", OK), ("pp send/recv", "n2 stage 1", WARN)]
    assert rows[0].detail == ("stage 0's TP all-reduce (2 ranks; nccl) 850 µs, 9.50 GB/s; expected < 30 µs and "
                              "> 100 GB/s on NVLink; GPUs 2 and 5 are linked through the CPU (SYS)")
    assert "NVLink island" in rows[0].fix
    assert rows[2].detail.endswith("0.10 GB/s; expected > 0.125 GB/s on TCP over eth0 at 10 Gb/s")  # the sender's NIC
    # A setting that forces a slower transport is the fix to try first.
    forced = dataclasses.replace(node, slower_transport_env={"NCCL_P2P_DISABLE": "1"})
    rows = collective_rows(["n1 stage 0", "n2 stage 1"], sites, timings, [forced, other], "cuda")
    assert rows[0].fix.startswith("NCCL_P2P_DISABLE=1 set on 10.0.0.2")
    # gloo on CPU within one host: measured, never judged.
    cpu = collective_rows(["a", "b"], sites, timings, [facts(), facts()], "cpu")
    assert all(r.result == OK and "measured only" in r.detail for r in cpu)


def test_auth():
    driver = facts()
    rows = auth_rows(driver, {"same": facts(), "other": facts(token_fingerprint="ffffffffffff"),
                              "off": facts(auth_mode="disabled", token_fingerprint=None)})
    assert [r.result for r in rows] == [OK, FAIL, FAIL]
    assert "abc123abc123" in rows[1].detail and "~/.ray/auth_token" in rows[1].fix
    off = facts(auth_mode="disabled", token_fingerprint=None)
    assert auth_rows(off, {"off": off})[0].result == WARN


def test_table_puts_each_fix_under_its_row():
    report = Report((Check("plan", "cluster", OK, "tp=2 x pp=2"),
                     Check("model files", "10.0.0.2 stage 1", FAIL, "/m does not exist", "copy it")), 1.25)
    assert format_report(report).splitlines() == [
        "check        node              result  detail",
        "plan         cluster           ok      tp=2 x pp=2",
        "model files  10.0.0.2 stage 1  fail    /m does not exist",
        "                                       fix: copy it",
        "",
        "doctor: 1 ok, 0 warn, 1 fail, 0 skipped in 1.2 s",
    ]


# -- the whole doctor on the simulated 2 x 2 cluster ------------------------------------------


def write_config(path, model_dir) -> str:
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "dtype": "float32",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "device": "cpu"},
        "engine": {"max_model_len": 256, "block_size": 8, "num_kv_blocks": 32},
    }))
    return str(path)


@pytest.mark.slow
def test_green_on_the_simulated_cluster(ray_cluster_2x2, tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama_dir[0])
    assert main(["doctor", config, "--address", ray_cluster_2x2.address]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = parse_table(out)
    assert {r["check"] for r in rows} == {"plan", "placement", "versions", "cuda", "memory", "model files",
                                          "interface", "ray auth", "reachable", "tp all-reduce", "pp send/recv"}
    assert {r["result"] for r in rows} == {OK}, out
    # The probes are gone: the cluster is as free as before.
    assert ray.available_resources().get("GPU") == 4
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.mark.slow
def test_held_gpus_fail_fast_and_serve_stops_on_the_same_rows(ray_cluster_2x2, tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama_dir[0])
    # One GPU of one node held by other work: tp=2 x pp=2 cannot be placed now.
    held = placement_group([{"GPU": 1}])
    ray.get(held.ready(), timeout=60)
    try:
        assert main(["doctor", config, "--address", ray_cluster_2x2.address]) == 1
        out = capsys.readouterr().out
        print(out)
        failed = [r for r in parse_table(out) if r["result"] == FAIL]
        assert {r["check"] for r in failed} == {"placement"} and all(r["fix"] for r in failed)
        held_node = [r for r in failed if r["node"] != "cluster"]
        assert len(held_node) == 1 and "1 of 2 GPUs free" in held_node[0]["detail"]
        assert "ray list placement-groups" in held_node[0]["fix"]

        assert main(["serve", config, "--address", ray_cluster_2x2.address]) == 2
        err = capsys.readouterr().err
        assert "pass --skip-doctor" in err
        assert sorted(map(comparable, (r for r in parse_table(err) if r["result"] == FAIL))) == \
            sorted(map(comparable, failed))
    finally:
        remove_placement_group(held)


@pytest.mark.slow
def test_an_incomplete_checkpoint_is_the_plan_row(ray_cluster_2x2, tiny_llama_dir, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((tiny_llama_dir[0] / "config.json").read_bytes())
    assert main(["doctor", write_config(tmp_path / "c.yaml", config_only), "--address", ray_cluster_2x2.address]) == 1
    rows = parse_table(capsys.readouterr().out)
    assert [(r["check"], r["node"], r["result"]) for r in rows] == [("plan", "driver", FAIL)]
    assert "no model.safetensors" in rows[0]["detail"] and rows[0]["fix"]
