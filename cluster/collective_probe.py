"""A stand-in worker that measures a replica's links before the replica exists.

The doctor places one `CollectiveProbe` per rank with the replica's own `place_workers`
(so a layout that cannot be placed shows here first), each bound to the interface a
worker binds (`bind_collectives_to_node_interface`). Between nodes the probes first open
plain TCP connections on the collectives' addresses, which fail in milliseconds where a
process group would hang; then they build the real process groups (`init_parallel`, the
mesh `arange(pp * tp).reshape(pp, tp)`) and time, with the groups' short timeout:

- an all-reduce in each TP group (a row of the mesh), through the group's own
  `TPGroup.all_reduce` (shared memory or the backend, as the replica's would go): a small
  message for latency and a large one for bandwidth, reported as bus bandwidth,
  size / time * 2 (n - 1) / n (the bytes each rank's link carries in a ring all-reduce,
  as nccl-tests reports it);
- a ping-pong on each pipeline edge (TP rank i of stage s with TP rank i of stage s + 1):
  one way = round trip / 2, bandwidth = size / one way.

Every rank walks the same sequence (its TP group, then edges 0 .. pp - 2 in order, taking
part in those that touch its stage), so the blocking sends and receives pair up.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from actors.comm import ParallelContext, destroy_parallel, init_parallel
from actors.net_interface import bind_collectives_to_node_interface
from cluster.node_facts import ipv4_interfaces, socket_interface

LATENCY_BYTES = 8 << 10  # a decode step's hidden state for one token of a 4k-wide model in bf16
BANDWIDTH_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}  # gloo on CPU is slow: keep the probe short
LATENCY_ITERS, BANDWIDTH_ITERS, WARMUP_ITERS = 20, 5, 3


@dataclass(frozen=True)
class Site:
    """Where a probe landed."""

    node_id: str
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True)
class LinkTiming:
    latency_us: float  # the small message
    gbps: float  # the large one: bus bandwidth (all-reduce) or one-way bandwidth (edge)
    via: str  # the transport, e.g. "nccl", or "shared memory for 8 KiB, gloo for 4 MiB"


@dataclass(frozen=True)
class RankTimings:
    stage: int
    tp_rank: int
    all_reduce: LinkTiming | None  # None when tp == 1
    send_next: LinkTiming | None  # the edge to the next stage, timed by its sender; None on the last


class CollectiveProbe:
    def __init__(self, stage: int, tp_rank: int, tp: int, pp: int, device: str):
        bind_collectives_to_node_interface(ray.util.get_node_ip_address())
        self.stage, self.tp_rank, self.tp, self.pp = stage, tp_rank, tp, pp
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device == "cuda" else "gloo"
        self._listener: socket.socket | None = None

    def site(self) -> Site:
        return Site(ray.get_runtime_context().get_node_id(), tuple(int(g) for g in ray.get_gpu_ids()))

    def listen(self) -> tuple[str, int] | None:
        """Listen on the collectives' address of this node; (address, port), or None when
        this node has no address for them (the node facts say why)."""
        address = self._address()
        if address is None:
            return None
        self._listener = socket.create_server((address, 0))
        return address, self._listener.getsockname()[1]

    def connect(self, address: str, port: int, timeout_s: float) -> str | None:
        """Open a TCP connection from this node's collectives' address, as the library
        would; None on success, else why not."""
        source = self._address()
        try:
            with socket.create_connection((address, port), timeout=timeout_s,
                                          source_address=(source, 0) if source else None):
                return None
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except OSError as e:
            return e.strerror or str(e)

    def _address(self) -> str | None:
        """This node's address for the collectives, by the workers' rule."""
        return socket_interface(self.backend, ipv4_interfaces(), ray.util.get_node_ip_address()).address

    def measure(self, init_method: str, timeout_s: float) -> RankTimings:
        ctx = init_parallel(stage=self.stage, tp_rank=self.tp_rank, tp_size=self.tp, pp_size=self.pp,
                            init_method=init_method, backend=self.backend, timeout_s=timeout_s)
        try:
            all_reduce = self._all_reduce(ctx) if self.tp > 1 else None
            send_next = None
            for edge in range(self.pp - 1):
                if self.stage == edge:
                    send_next = self._ping_pong(ctx.pp.next_rank, initiate=True)
                elif self.stage == edge + 1:
                    self._ping_pong(ctx.pp.prev_rank, initiate=False)
        finally:
            destroy_parallel()
        return RankTimings(self.stage, self.tp_rank, all_reduce, send_next)

    def _all_reduce(self, ctx: ParallelContext) -> LinkTiming:
        """Through the replica's own TP group: shared memory where its CPU ranks share a
        host and the tensor fits, else the backend."""
        def op(x: torch.Tensor) -> None:
            ctx.tp.all_reduce(x)

        def via(nbytes: int) -> str:
            x = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device)
            return "shared memory" if ctx.tp.shm is not None and ctx.tp.shm.fits(x) else self.backend

        n = ctx.tp.size
        latency = self._seconds_per_op(op, LATENCY_BYTES, LATENCY_ITERS)
        large = BANDWIDTH_BYTES[self.device.type]
        seconds = self._seconds_per_op(op, large, BANDWIDTH_ITERS)
        small_via, large_via = via(LATENCY_BYTES), via(large)
        paths = small_via if small_via == large_via else (
            f"{small_via} for {LATENCY_BYTES >> 10} KiB, {large_via} for {large >> 20} MiB")
        return LinkTiming(latency * 1e6, large / seconds * 2 * (n - 1) / n / 1e9, paths)

    def _ping_pong(self, peer: int, initiate: bool) -> LinkTiming:
        def op(x: torch.Tensor) -> None:
            if initiate:
                dist.send(x, dst=peer)
                dist.recv(x, src=peer)
            else:
                dist.recv(x, src=peer)
                dist.send(x, dst=peer)

        one_way = self._seconds_per_op(op, LATENCY_BYTES, LATENCY_ITERS) / 2
        large = BANDWIDTH_BYTES[self.device.type]
        large_one_way = self._seconds_per_op(op, large, BANDWIDTH_ITERS) / 2
        return LinkTiming(one_way * 1e6, large / large_one_way / 1e9, self.backend)

    def _seconds_per_op(self, op: Callable[[torch.Tensor], None], nbytes: int, iters: int) -> float:
        x = torch.zeros(nbytes // 4, dtype=torch.float32, device=self.device)
        for _ in range(WARMUP_ITERS):
            op(x)
        self._sync()
        start = time.perf_counter()
        for _ in range(iters):
            op(x)
        self._sync()
        return (time.perf_counter() - start) / iters

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
