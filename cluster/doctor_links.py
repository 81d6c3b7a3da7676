"""The doctor's judgments of the links between ranks: the interface each node's collectives
bind, whether the other nodes reach it, and how fast the TP all-reduces and pipeline edges
run against what their interconnect should give (`cluster.interconnect`).
"""

from __future__ import annotations

import ipaddress

from cluster.collective_probe import RankTimings, Site
from cluster.doctor_checks import FAIL, OK, WARN, Check
from cluster.interconnect import NO_EXPECTATION, gpu_group_expectation, judge, network_expectation
from cluster.node_facts import NodeFacts


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _node_interface(f: NodeFacts) -> str | None:
    return next((name for name, address in f.interfaces.items() if address == f.node_ip), None)


def _elsewhere(f: NodeFacts) -> str:
    """How to point a node's collectives at an interface the others reach."""
    s, iface = f.socket, _node_interface(f)
    hint = f" ({iface} holds the Ray node IP {f.node_ip})" if iface else ""
    unset = ", or unset it" if s.from_user else ""
    return f"set {s.variable} to an interface the other nodes reach{hint}{unset}, then restart Ray there"


def interface_rows(nodes: dict[str, NodeFacts], spans_hosts: bool) -> list[Check]:
    """The interface and address gloo or NCCL will bind on each node, by the workers' rule:
    the user's GLOO/NCCL_SOCKET_IFNAME, else the interface holding the Ray node IP."""
    rows = []
    for label, f in nodes.items():
        s = f.socket
        lib = "NCCL" if s.variable.startswith("NCCL") else "gloo"
        origin = f"from {s.variable}={s.setting}" if s.from_user else "the interface of the Ray node IP"
        if s.setting is None:
            fallback = f.hostname_address or "nothing"
            bad = f.hostname_address is None or (spans_hosts and _loopback(f.hostname_address))
            rows.append(Check(
                "interface", label, FAIL if bad else WARN,
                f"no interface holds the Ray node IP {f.node_ip} and {s.variable} is unset: {lib} falls "
                f"back to the hostname {f.hostname}, which resolves to {fallback}",
                f"set {s.variable} on this node to the interface the other nodes reach, or start Ray "
                "with --node-ip-address set to one of this node's addresses"))
        elif s.interface is None:
            rows.append(Check("interface", label, FAIL,
                              f"{s.variable}={s.setting} matches no interface here (it has {', '.join(f.interfaces)})",
                              _elsewhere(f)))
        elif s.address is None:
            rows.append(Check("interface", label, FAIL, f"{s.interface} ({origin}) has no IPv4 address", _elsewhere(f)))
        elif spans_hosts and _loopback(s.address):
            rows.append(Check("interface", label, FAIL,
                              f"{lib} binds {s.interface} ({s.address}, {origin}): loopback, which the other "
                              "nodes cannot reach", _elsewhere(f)))
        else:
            also = f"; the Ray node IP {f.node_ip} is on {_node_interface(f)}" if s.address != f.node_ip else ""
            rows.append(Check("interface", label, OK, f"{lib} binds {s.interface} ({s.address}), {origin}{also}"))
    return rows


def reachability_row(src_label: str, src: NodeFacts, dst_label: str, dst: NodeFacts, address: str, port: int,
                     error: str | None) -> Check:
    """A TCP connection from node `src`'s collectives' address to a listener on node
    `dst`'s: what a process group's first connection does, minus the hang."""
    origin = f", from {dst.socket.variable}={dst.socket.setting}" if dst.socket.from_user else ""
    what = (f"TCP from {src_label} ({src.socket.address}) to {address}:{port} "
            f"({dst.socket.interface}{origin})")
    if error is None:
        return Check("reachable", dst_label, OK, f"{what}: connects")
    fix = (f"let {src.socket.address} and {address} reach each other over TCP on any port (routes, "
           "firewalls: gloo and NCCL pick ports at random)")
    for label, f in ((dst_label, dst), (src_label, src)):
        if f.socket.from_user:
            fix += f"; or on {label}: {_elsewhere(f)}"
    return Check("reachable", dst_label, FAIL, f"{what}: {error}", fix)


def _unset(f: NodeFacts) -> str:
    """The fix when a node's environment forces NCCL onto a slower transport, else ""."""
    if not f.slower_transport_env:
        return ""
    settings = ", ".join(f"{k}={v}" for k, v in f.slower_transport_env.items())
    return f"{settings} set on {f.node_ip} pushes NCCL onto a slower transport: unset it and restart Ray there"


def collective_rows(labels: list[str], sites: list[list[Site]], timings: list[RankTimings],
                    facts: list[NodeFacts], device: str) -> list[Check]:
    """One row per TP group and per pipeline edge; `labels`, `sites` and `facts` are per
    stage (facts of the stage's node). A link slower than its interconnect should be is a
    warning that names the link."""
    rows = []
    pp = len(sites)
    for s in range(pp):
        measured = [t.all_reduce for t in timings if t.stage == s and t.all_reduce is not None]
        if not measured:
            continue
        expected, why = NO_EXPECTATION, None
        if device == "cuda":
            gpus = [g for site in sites[s] for g in site.gpu_ids]
            expected, why = gpu_group_expectation(facts[s].topology or "", gpus)
        within, sentence = judge(f"stage {s}'s TP all-reduce ({len(sites[s])} ranks; {measured[0].via})",
                                 max(m.latency_us for m in measured), min(m.gbps for m in measured), expected, why)
        rows.append(Check("tp all-reduce", labels[s], OK if within else WARN, sentence, "" if within else (
            _unset(facts[s]) or
            ("keep each stage's GPUs on one NVLink island (Ray hands out the GPUs CUDA_VISIBLE_DEVICES "
             "lists when it starts)" if why else "check `nvidia-smi topo -m` and `nvidia-smi nvlink --status`"))))
    for s in range(pp - 1):
        measured = [t.send_next for t in timings if t.stage == s and t.send_next is not None]
        if not measured:
            continue
        src, dst = facts[s], facts[s + 1]
        if sites[s][0].node_id == sites[s + 1][0].node_id and device == "cuda":
            expected, _ = gpu_group_expectation(src.topology or "", [*sites[s][0].gpu_ids, *sites[s + 1][0].gpu_ids])
        elif src.node_ip == dst.node_ip:
            expected = NO_EXPECTATION
        else:
            expected = network_expectation(src.socket.interface, src.socket.speed_mbps)
        within, sentence = judge(f"stage {s} -> {s + 1} send/recv (one way; {measured[0].via})",
                                 max(m.latency_us for m in measured), min(m.gbps for m in measured), expected, None)
        rows.append(Check("pp send/recv", labels[s + 1], OK if within else WARN, sentence, "" if within else (
            _unset(src) or f"the edge runs over {src.socket.interface}: check that it is the fast network "
            f"between the nodes ({src.socket.variable}) and its link speed (ethtool)")))
    return rows
