"""Two test "hosts" on one machine, for a real `ray up`: network namespaces on a bridge,
each running its own sshd.

    root namespace   tf2h-br 10.231.0.254/24 (a bridge)
      tf2h-a  <-veth->  host A: netns tf2h-a, eth0 10.231.0.1/24, sshd on 10.231.0.1:22
      tf2h-b  <-veth->  host B: netns tf2h-b, eth0 10.231.0.2/24, sshd on 10.231.0.2:22

Each sshd runs in its own mount and PID namespace (`unshare --mount --pid`), with a
per-host home bind-mounted over /root: Ray writes `~/ray_bootstrap_key.pem`, the auth token
and `~/.bashrc` per host, as on separate machines. The rest of the filesystem is shared
(the venv, the model under /tmp). Killing the sshd (PID 1 of its namespace) kills every
process started through it, so a `ray stop` on a host never reaches another Ray on this
machine. The addresses exist only inside this machine; nothing is routed elsewhere.

The names are fixed, so one test session at a time owns them: `TwoHosts.start` takes an
exclusive lock (`LOCK`, released when the hosts stop or the session dies) before it clears
an earlier run's leftovers, and a second session waits for it rather than tearing down the
first one's hosts.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK = Path("/tmp/tf2h.lock")
BRIDGE = "tf2h-br"
BRIDGE_IP = "10.231.0.254"
PREFIX = 24


@dataclass(frozen=True)
class Host:
    name: str  # the network namespace, and the root side of its veth pair
    ip: str
    home: Path  # bind-mounted over /root inside the host


HOST_SPECS = (("tf2h-a", "10.231.0.1"), ("tf2h-b", "10.231.0.2"))


class NamespaceError(RuntimeError):
    """This machine cannot create network namespaces (not root, or no CAP_SYS_ADMIN)."""


class HostsBusy(RuntimeError):
    """Another test session holds the two hosts (the lock) for longer than we wait."""


def _take_lock(timeout_s: float) -> IO:
    lock = open(LOCK, "w")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise HostsBusy(f"another test session has held the two test hosts ({LOCK}) for "
                                f"{timeout_s:.0f}s") from None
            time.sleep(1)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = "tf2h-probe"
    _run("ip", "netns", "del", probe, check=False)
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def remove_leftovers() -> None:
    """Kill what an earlier, killed run left in our namespaces, then delete them and links."""
    existing = _run("ip", "netns", "list", check=False).stdout
    for name, _ in HOST_SPECS:
        if name in existing.split():
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run("ip", "netns", "del", name, check=False)
        _run("ip", "link", "del", name, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)


def _python_prefixes() -> list[Path]:
    """Folders under /root that this Python needs (e.g. a pyenv install), to stay visible
    once a host's home covers /root."""
    prefixes = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix)}
    return sorted(p for p in prefixes if p.is_relative_to("/root"))


def _sshd_config(host: Host, key_dir: Path) -> Path:
    config = key_dir / f"sshd-{host.name}.conf"
    config.write_text(
        f"ListenAddress {host.ip}\n"
        f"HostKey {key_dir / 'host_key'}\n"
        "PidFile none\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "AuthorizedKeysFile /root/.ssh/authorized_keys\n"
        "PrintMotd no\n"
        "LogLevel ERROR\n"
    )
    return config


class TwoHosts:
    """Create with `TwoHosts.start(workdir, bashrc)`; always `stop()` (a fixture finalizer).

    `workdir` holds the SSH keys and the per-host homes; `bashrc` is each host's
    `~/.bashrc` (Ray's SSH commands source it), e.g. the logical GPUs it declares.
    """

    def __init__(self, workdir: Path, lock: IO):
        self.workdir = workdir
        self._lock = lock
        self.key = workdir / "ssh" / "id_ed25519"  # the client key ray up logs in with
        self.hosts = tuple(Host(name, ip, workdir / name) for name, ip in HOST_SPECS)
        self._sshd: list[subprocess.Popen] = []

    @classmethod
    def start(cls, workdir: Path, bashrc: str, links: dict[str, Path], wait_s: float = 300) -> TwoHosts:
        """`links`: entries made in each home, name -> target (e.g. the venv). Waits up to
        `wait_s` for another session's hosts to stop (`HostsBusy` after that)."""
        lock = _take_lock(wait_s)
        remove_leftovers()
        hosts = cls(workdir, lock)
        try:
            hosts._make_network()
            hosts._make_homes(bashrc, links)
            hosts._start_sshd()
        except BaseException:
            hosts.stop()
            raise
        return hosts

    def _make_network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{BRIDGE_IP}/{PREFIX}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for h in self.hosts:
            _run("ip", "netns", "add", h.name)
            _run("ip", "link", "add", h.name, "type", "veth", "peer", "name", "eth0", "netns", h.name)
            _run("ip", "link", "set", h.name, "master", BRIDGE, "up")
            inside = ("ip", "netns", "exec", h.name, "ip")
            _run(*inside, "addr", "add", f"{h.ip}/{PREFIX}", "dev", "eth0")
            _run(*inside, "link", "set", "eth0", "up")
            _run(*inside, "link", "set", "lo", "up")

    def _make_homes(self, bashrc: str, links: dict[str, Path]) -> None:
        ssh_dir = self.key.parent
        ssh_dir.mkdir(parents=True, mode=0o700)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / "host_key"))
        for h in self.hosts:
            (h.home / ".ssh").mkdir(parents=True, mode=0o700)
            shutil.copy(f"{self.key}.pub", h.home / ".ssh" / "authorized_keys")
            (h.home / ".bashrc").write_text(bashrc)
            for name, target in links.items():
                (h.home / name).symlink_to(target)
            for prefix in _python_prefixes():
                (h.home / prefix.relative_to("/root")).mkdir(parents=True, exist_ok=True)

    def _start_sshd(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for h in self.hosts:
            # Python installs under /root are bound into the home first; --rbind keeps them.
            mounts = [f"mount --bind {p} {h.home / p.relative_to('/root')}" for p in _python_prefixes()]
            mounts.append(f"mount --rbind {h.home} /root")
            script = " && ".join([*mounts, f"exec /usr/sbin/sshd -D -e -f {_sshd_config(h, self.key.parent)}"])
            self._sshd.append(subprocess.Popen(
                ["ip", "netns", "exec", h.name, "unshare", "--mount", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "--propagation", "private", "sh", "-c", script],
                stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"sshd-{h.name}.log", "w"),
                start_new_session=True,
            ))
        for h, proc in zip(self.hosts, self._sshd):
            _wait_for_port(h.ip, 22, proc, self.workdir / f"sshd-{h.name}.log")

    def processes(self, host: Host) -> list[str]:
        """Command lines of the processes in a host's network namespace."""
        cmdlines = []
        for pid in _run("ip", "netns", "pids", host.name, check=False).stdout.split():
            try:
                cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
        return cmdlines

    def stop(self) -> None:
        """Kill each host (its sshd and so everything started through it), then delete the
        namespaces, the links and the bridge. Safe to call twice."""
        for proc in self._sshd:
            if proc.poll() is None:
                # unshare ignores SIGTERM while it waits; dying, --kill-child takes the
                # namespace's PID 1 (sshd) and with it every process of the host.
                proc.kill()
                proc.wait(timeout=10)
        self._sshd.clear()
        if not self._lock.closed:
            remove_leftovers()
            self._lock.close()  # releases the flock


def _wait_for_port(ip: str, port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd for {ip} exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((ip, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"sshd on {ip}:{port} did not listen within {timeout_s:.0f}s: {log.read_text()}")
