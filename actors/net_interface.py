"""The network interface a worker's collectives bind to.

gloo and NCCL otherwise resolve the hostname, which on many machines names another
interface (a docker bridge, 127.0.1.1) than the one the other nodes reach. The rule: the
user's GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when set, else the interface holding the
node's Ray IP, the address Ray itself reaches the node by. The Ray actor shell applies it
(`bind_collectives_to_node_interface`); `tensorfleet doctor` reports and probes it. Ray
itself stays outside: callers pass the node IP.
"""

import os
import socket

import psutil

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(ip: str) -> str | None:
    """The network interface holding `ip`."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def socket_ifnames(node_ip: str) -> dict[str, str | None]:
    """What GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME are in a worker on the node whose Ray
    IP is `node_ip` (None: neither the user's setting nor an interface holding the node IP;
    the libraries then fall back to the hostname's address)."""
    node_iface = interface_of(node_ip)
    return {var: os.environ.get(var) or node_iface for var in SOCKET_IFNAME_VARS}


def bind_collectives_to_node_interface(node_ip: str) -> None:
    """Set `socket_ifnames(node_ip)` in this process's environment, before any process group."""
    for var, iface in socket_ifnames(node_ip).items():
        if iface is not None:
            os.environ[var] = iface
