"""What a link between ranks should carry, to judge a timed collective against.

Inside a GPU node, `nvidia-smi topo -m` names the link between every pair of GPUs:

    NV#   a bonded set of # NVLinks
    PIX   at most one PCIe bridge              PXB   several PCIe bridges, no host bridge
    PHB   a PCIe host bridge (the CPU)         NODE  PCIe host bridges within a NUMA node
    SYS   PCIe and the interconnect between NUMA nodes (QPI / UPI)

A TP group is only as fast as its weakest pair, and it should be as fast as the best link
the node offers: a group of NVLink GPUs that measures like PCIe, or a group that straddles
two NVLink islands, both show up as "slower than expected". Between nodes the reference is
the line rate of the network interface the collectives use (`/sys/class/net/IF/speed`).
CPU ranks on one host (shared memory, or gloo over loopback TCP) have no line rate to
bound them: measured only.

The floors below are conservative (healthy links beat them several times over); a
measurement past one is a warning, never a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Best first. "NV" stands for every NV# (bonded NVLinks).
LINK_KINDS = ("NV", "PIX", "PXB", "PHB", "NODE", "SYS")
LINK_WORDS = {
    "NV": "NVLink",
    "PIX": "one PCIe bridge (PIX)",
    "PXB": "several PCIe bridges (PXB)",
    "PHB": "a PCIe host bridge (PHB)",
    "NODE": "PCIe host bridges of one NUMA node (NODE)",
    "SYS": "the CPU (SYS)",
}
# A network link should carry at least this share of its line rate in one direction.
NETWORK_SHARE = 0.1


@dataclass(frozen=True)
class Expectation:
    """What a link should give: a small message within `max_latency_us` (None: no bound),
    a large one at `min_gbps` GB/s or more (None: no bound)."""

    link: str  # in words, e.g. "NVLink", "TCP over eth0 at 10 Gb/s"
    max_latency_us: float | None
    min_gbps: float | None


GPU_LINKS = {
    "NV": Expectation("NVLink", 30, 100),
    "PIX": Expectation("PCIe", 60, 5),
    "PXB": Expectation("PCIe", 60, 5),
    "PHB": Expectation("PCIe", 80, 5),
    "NODE": Expectation("PCIe across host bridges", 80, 4),
    "SYS": Expectation("PCIe through the CPU", 100, 3),
}
NO_EXPECTATION = Expectation("CPU ranks on one host", None, None)


def parse_topology(text: str) -> dict[tuple[int, int], str]:
    """`nvidia-smi topo -m` -> {(gpu_a, gpu_b): cell} for every ordered pair a != b,
    e.g. {(0, 1): "NV12", (0, 4): "SYS", ...}. NIC columns, affinity columns and the legend
    are ignored; the GPU columns come first in the header and in every GPU row."""
    lines = text.splitlines()
    header = next((ln for ln in lines if re.match(r"\s+GPU\d+\b", ln)), None)
    if header is None:
        return {}
    columns = []
    for token in header.split():
        if not re.fullmatch(r"GPU\d+", token):
            break
        columns.append(int(token[3:]))
    links = {}
    for line in lines:
        cells = line.split()
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]) or len(cells) <= len(columns):
            continue
        row = int(cells[0][3:])
        for col, cell in zip(columns, cells[1:]):
            if col != row:
                links[(row, col)] = cell
    return links


def link_kind(cell: str) -> str:
    """'NV12' -> 'NV'; 'SYS' -> 'SYS'; an unknown cell counts as the slowest kind."""
    if re.fullmatch(r"NV\d+", cell):
        return "NV"
    return cell if cell in LINK_KINDS else "SYS"


def _rank(kind: str) -> int:
    return LINK_KINDS.index(kind)


def gpu_group_expectation(topology: str, gpus: list[int]) -> tuple[Expectation, str | None]:
    """What a TP group on `gpus` (nvidia-smi indices) of a node with this topology should
    give, and, when the group's weakest pair is slower than the node's best link, the
    sentence that names it ("GPUs 2 and 5 are linked through the CPU (SYS)")."""
    links = parse_topology(topology)
    if not links:
        return Expectation("GPUs of unknown topology", None, None), None
    best = min((link_kind(c) for c in links.values()), key=_rank)
    pairs = [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1:] if (a, b) in links]
    if not pairs:
        return GPU_LINKS[best], None
    a, b = max(pairs, key=lambda p: _rank(link_kind(links[p])))
    weakest = link_kind(links[(a, b)])
    if _rank(weakest) <= _rank(best):
        return GPU_LINKS[best], None
    return GPU_LINKS[best], f"GPUs {a} and {b} are linked through {LINK_WORDS[weakest]}"


def network_expectation(interface: str | None, speed_mbps: int | None) -> Expectation:
    """Between nodes: a share of the interface's line rate (unknown rate: no bound)."""
    name = interface or "the default route"
    if not speed_mbps or speed_mbps <= 0:
        return Expectation(f"TCP over {name}", None, None)
    rate = f"{speed_mbps / 1000:g} Gb/s"
    return Expectation(f"TCP over {name} at {rate}", None, speed_mbps / 8000 * NETWORK_SHARE)


def judge(what: str, latency_us: float, gbps: float, expected: Expectation,
          why: str | None) -> tuple[bool, str]:
    """(within expectation, sentence), e.g. (False, "stage 1's TP all-reduce 850 µs,
    2.10 GB/s; expected < 30 µs and > 100 GB/s on NVLink; GPUs 2 and 5 are linked through
    the CPU (SYS)")."""
    measured = f"{what} {latency_us:.0f} µs, {gbps:.2f} GB/s"
    bounds = []
    if expected.max_latency_us is not None:
        bounds.append((latency_us <= expected.max_latency_us, f"< {expected.max_latency_us:g} µs"))
    if expected.min_gbps is not None:
        bounds.append((gbps >= expected.min_gbps, f"> {expected.min_gbps:g} GB/s"))
    misses = [text for ok, text in bounds if not ok]
    if misses:
        return False, f"{measured}; expected {' and '.join(misses)} on {expected.link}" + (f"; {why}" if why else "")
    if bounds:
        return True, f"{measured} (expected {' and '.join(text for _, text in bounds)} on {expected.link})"
    return True, f"{measured} ({expected.link}: measured only)"
