"""A real two-host deployment: `ray up` with deploy/clusters/local.yaml brings up a head on
host A and a worker on host B (network namespaces with their own sshd, tests/two_hosts.py),
each declaring 2 logical GPUs. One cluster serves every test of this module:

- `tensorfleet serve --address` (run on host A through `ray exec`) serves a small model at
  tp=2 x pp=2, one pipeline stage per host, the TP groups and the stage-to-stage edge over
  gloo on the namespaces' addresses; an HTTP request from this process gets Hugging Face's
  greedy tokens;
- `tensorfleet doctor` passes on the healthy cluster, then finds four misconfigurations,
  one at a time, each named with its node and fix within 30 s; `serve` stops on the same
  rows (exit 2) instead of hanging.

Only the site-specific fields of the shipped YAML are replaced (addresses, SSH user and
key, where the auth token comes from); its setup and start commands run as written. Each
host's ~/.bashrc stands in for its hardware (2 logical GPUs), points ~/tensorfleet-venv at
this checkout's venv, which the setup command then finds installed, and puts the host's own
synced copy of the checkout (~/tensorfleet) first on the PYTHONPATH, as an install from it
would. Host B also has a second interface, eth1 (10.232.0.2, one end of a veth pair), and pins
gloo to it with GLOO_SOCKET_IFNAME=eth1, as on a machine with a separate network for the
collectives; host A reaches it through a route via B's eth0.
"""

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.doctor_table import comparable, doctor_seconds, parse_table
from tests.two_hosts import HostsBusy, TwoHosts, namespaces_unavailable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = REPO / ".venv" / "bin" / "ray"
MODEL = "tiny-py"
PORT = 8000
HOST_BASHRC = """\
# This test host's hardware: 2 logical GPUs, which Ray schedules like real ones.
export RAY_OVERRIDE_RESOURCES='{"CPU": 4, "GPU": 2}'
export RAY_USAGE_STATS_ENABLED=0
# The autoscaler's state file of the local provider, per host as on separate machines.
export RAY_TMPDIR=/root/ray-tmp
# This host runs its own copy of the checkout, the one `ray up` synced.
export PYTHONPATH=$HOME/tensorfleet
"""
COLLECTIVES_IP = "10.232.0.2"  # host B's eth1
HOST_B_BASHRC = HOST_BASHRC + "# gloo on the collectives' network\nexport GLOO_SOCKET_IFNAME=eth1\n"
DOCTOR_DEADLINE_S = 30  # the bound: a misconfiguration is named within this


def ray_temp_dirs(hosts: TwoHosts) -> list[Path]:
    """Where local.yaml's start commands put each node's Ray session (--temp-dir)."""
    return [Path(f"/tmp/tf-ray-{h.ip}") for h in hosts.hosts]


def netns(host, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", host.name, *cmd], check=True, capture_output=True, timeout=30)


def pids_of(host, needle: str) -> list[int]:
    """Processes in a host's network namespace whose command line contains `needle`."""
    pids = []
    for pid in subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"the two-host test makes its hosts as network namespaces, and {reason}")
    missing = [tool for tool in ("/usr/sbin/sshd", "/usr/bin/rsync", "/usr/bin/ssh-keygen")
               if not os.path.exists(tool)]
    assert not missing, f"{missing} not installed: run `bash .ci/system-packages` (as root)"
    try:
        hosts = TwoHosts.start(tmp_path_factory.mktemp("two-hosts"), HOST_BASHRC,
                               {"tensorfleet-venv": REPO / ".venv"})
    except HostsBusy as e:
        pytest.skip(str(e))
    head, worker = hosts.hosts
    try:
        (worker.home / ".bashrc").write_text(HOST_B_BASHRC)
        # eth1: one end of a veth pair whose other end stays inside host B (no dummy
        # driver needed); only the route on host A makes its address reachable.
        netns(worker, "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer")
        netns(worker, "ip", "addr", "add", f"{COLLECTIVES_IP}/24", "dev", "eth1")
        for link in ("eth1", "eth1-peer"):
            netns(worker, "ip", "link", "set", link, "up")
        netns(head, "ip", "route", "add", COLLECTIVES_IP, "via", worker.ip)
    except BaseException:
        hosts.stop()
        raise
    for d in ray_temp_dirs(hosts):
        shutil.rmtree(d, ignore_errors=True)  # an earlier killed run's sessions
    yield hosts
    start = time.perf_counter()
    hosts.stop()
    for d in ray_temp_dirs(hosts):
        shutil.rmtree(d, ignore_errors=True)
    print(f"[two hosts] namespaces and links removed in {time.perf_counter() - start:.1f}s")


def cluster_yaml(hosts: TwoHosts) -> Path:
    """deploy/clusters/local.yaml with this site's addresses, SSH login and token."""
    config = yaml.safe_load((REPO / "deploy" / "clusters" / "local.yaml").read_text())
    head, worker = hosts.hosts
    token = hosts.workdir / "auth_token"
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    config["cluster_name"] = "tf-two-hosts"
    config["provider"].update(head_ip=head.ip, worker_ips=[worker.ip])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    path = hosts.workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ray_cli(hosts: TwoHosts, *args: str, timeout: float) -> str:
    """`ray up / exec / down` from this (the root) namespace, as a user's laptop would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_UP_enable_autoscaler_v2="0",  # v2 never starts local-provider workers (Ray 2.60)
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(hosts.workdir / "ray-cli"),  # the launcher's state of the local provider
    )
    done = subprocess.run([str(RAY), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"ray {args[0]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def wait_for(what: str, check, timeout_s: float, diagnose=lambda: "") -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{what} not within {timeout_s:.0f}s\n{diagnose()}")
        time.sleep(0.5)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def cluster(hosts):
    """`ray up` once for the module, `ray down` after it; yields the cluster YAML."""
    head, worker = hosts.hosts
    config = cluster_yaml(hosts)
    start = time.perf_counter()
    ray_cli(hosts, "up", "-y", "--no-config-cache", str(config), timeout=240)
    up = time.perf_counter() - start
    joined = wait_for("host B's raylet", lambda: any("raylet" in c for c in hosts.processes(worker)), 120)
    print(f"[two hosts] ray up {up:.1f}s, worker joined {joined:.1f}s")
    yield config
    start = time.perf_counter()
    ray_cli(hosts, "down", "-y", str(config), timeout=120)
    print(f"[two hosts] ray down {time.perf_counter() - start:.1f}s")
    assert not any("gcs_server" in c or "raylet" in c for c in hosts.processes(head))


def serve_config(hosts: TwoHosts, model: Path | str, name: str = "tensorfleet.yaml") -> Path:
    head = hosts.hosts[0]
    path = hosts.workdir / name
    path.write_text(yaml.safe_dump({
        "model": str(model), "served_model_name": MODEL, "dtype": "float32",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "device": "cpu"},
        "engine": {"max_model_len": 512, "num_kv_blocks": 128, "max_num_seqs": 8},
        "serve": {"host": head.ip, "port": PORT},
    }))
    return path


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def hf_greedy_text(model_dir: Path, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_ray_up_serves_tp2_pp2_across_two_hosts(hosts, cluster, chat_model_dir):
    head, _ = hosts.hosts
    config = serve_config(hosts, chat_model_dir)
    url = f"http://{head.ip}:{PORT}"
    serve_log = head.home / "serve.log"
    timings: dict[str, float] = {}

    # The driver runs on the head, as a user's would (`ray exec` / `ray attach`), with the
    # cluster's token (~/.ray/auth_token there): Ray sends it only in token mode.
    start = time.perf_counter()
    ray_cli(hosts, "exec", str(cluster),
            f"RAY_AUTH_MODE=token nohup ~/tensorfleet-venv/bin/tensorfleet serve {config} "
            f"--address {head.ip}:6379 > ~/serve.log 2>&1 < /dev/null &", timeout=60)

    def serving() -> bool:
        if not any("tensorfleet serve" in c for c in hosts.processes(head)):
            raise RuntimeError(f"tensorfleet serve exited on host A:\n{serve_log.read_text()[-4000:]}")
        return healthy(url)

    wait_for("the served model's /health", serving, 300, diagnose=lambda: serve_log.read_text()[-4000:])
    timings["doctor + deploy + model load"] = time.perf_counter() - start
    assert "doctor: " in serve_log.read_text()  # serve ran the doctor first, and it passed

    # One pipeline stage per host: each host runs one TP group's two workers.
    for h in hosts.hosts:
        workers = [c for c in hosts.processes(h) if c.startswith("ray::RayWorker")]
        assert len(workers) == 2, f"{h.name} ({h.ip}) runs {len(workers)} workers: {workers}"

    prompt = "def read_file(path):\n"
    want = hf_greedy_text(chat_model_dir, prompt, 24)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    start = time.perf_counter()
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            timings.setdefault("first token", time.perf_counter() - start)
            pieces.append(chunk.choices[0].text)
    timings["24 tokens"] = time.perf_counter() - start
    assert "".join(pieces) == want
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == want and done.usage.completion_tokens == 24

    # Stop serving (SIGTERM: drain, then remove the workers) so the doctor finds the GPUs free.
    for pid in pids_of(head, "tensorfleet serve"):
        os.kill(pid, signal.SIGTERM)
    wait_for("serve to stop", lambda: not pids_of(head, "tensorfleet serve"), 120)
    wait_for("the workers to go", lambda: not any(pids_of(h, "ray::RayWorker") for h in hosts.hosts), 60)
    print("[two hosts] " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


# -- the doctor ------------------------------------------------------------------------------


def run_on_head(hosts: TwoHosts, cluster: Path, command: str, name: str, timeout: float) -> tuple[int, str, float]:
    """Run a tensorfleet command on host A as a user would; (exit code, output, seconds)."""
    head = hosts.hosts[0]
    out, rc = head.home / f"{name}.out", head.home / f"{name}.rc"
    rc.unlink(missing_ok=True)
    start = time.perf_counter()
    # `timeout` on the host: a command that hangs is killed there, not left behind.
    ray_cli(hosts, "exec", str(cluster),
            f"RAY_AUTH_MODE=token timeout {timeout:.0f} ~/tensorfleet-venv/bin/tensorfleet {command} "
            f"--address {head.ip}:6379 > ~/{name}.out 2>&1 < /dev/null; echo $? > ~/{name}.rc",
            timeout=timeout + 60)
    return int(rc.read_text()), out.read_text(), time.perf_counter() - start


def test_doctor_passes_on_the_healthy_cluster(hosts, cluster, chat_model_dir):
    config = serve_config(hosts, chat_model_dir)
    rc, out, seconds = run_on_head(hosts, cluster, f"doctor {config}", "doctor", timeout=120)
    print(f"\n[two hosts] tensorfleet doctor ({seconds:.1f}s with the CLI's start):\n{out}")
    rows = parse_table(out)
    assert rc == 0, out
    assert not [r for r in rows if r["result"] == "fail"], out
    checks = {r["check"] for r in rows}
    assert {"versions", "model files", "interface", "reachable", "tp all-reduce", "pp send/recv"} <= checks
    interface_b = next(r for r in rows if r["check"] == "interface" and r["node"].startswith(hosts.hosts[1].ip))
    assert f"eth1 ({COLLECTIVES_IP}), from GLOO_SOCKET_IFNAME=eth1" in interface_b["detail"]


@contextlib.contextmanager
def weights_only_on_host_a(hosts: TwoHosts, cluster: Path, model_dir: Path):
    """The model under /root on host A only: host B's /root is its own home."""
    copy = hosts.hosts[0].home / "models" / "tiny-py"
    shutil.copytree(model_dir, copy)
    try:
        yield "/root/models/tiny-py"
    finally:
        shutil.rmtree(copy.parent)


@contextlib.contextmanager
def no_route_to_host_b_eth1(hosts: TwoHosts, cluster: Path, model_dir: Path):
    """Host A loses its route to host B's collectives' address (B's eth1)."""
    head, worker = hosts.hosts
    netns(head, "ip", "route", "del", COLLECTIVES_IP)
    try:
        yield model_dir
    finally:
        netns(head, "ip", "route", "add", COLLECTIVES_IP, "via", worker.ip)


@contextlib.contextmanager
def other_code_on_host_b(hosts: TwoHosts, cluster: Path, model_dir: Path):
    """Host B's copy of the checkout drifts: one file more than the driver's (host A's)."""
    drift = hosts.hosts[1].home / "tensorfleet" / "cluster" / "local_patch.py"
    drift.write_text("# a change only host B has\n")
    try:
        yield model_dir
    finally:
        drift.unlink()


HOLD_ONE_GPU = """\
import sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_gpus=1, num_cpus=0)
class GpuHolder:
    def ready(self):
        return True


ray.init(address=sys.argv[1])
if sys.argv[2] == "hold":
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[3])
    holder = GpuHolder.options(name="gpu-holder", namespace="tf-test", lifetime="detached",
                               scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    ray.get(holder.ready.remote(), timeout=60)
else:
    ray.kill(ray.get_actor("gpu-holder", namespace="tf-test"))
"""


@contextlib.contextmanager
def one_gpu_held_on_host_b(hosts: TwoHosts, cluster: Path, model_dir: Path):
    """Other work (a detached actor) holds one of host B's two GPUs."""
    head, worker = hosts.hosts
    script = head.home / "hold_one_gpu.py"
    script.write_text(HOLD_ONE_GPU)
    python = f"RAY_AUTH_MODE=token ~/tensorfleet-venv/bin/python ~/{script.name} {head.ip}:6379"
    ray_cli(hosts, "exec", str(cluster), f"{python} hold {worker.ip}", timeout=120)
    try:
        yield model_dir
    finally:
        ray_cli(hosts, "exec", str(cluster), f"{python} release", timeout=120)


@pytest.mark.parametrize("breakage,check,detail", [
    (weights_only_on_host_a, "model files", "/root/models/tiny-py does not exist on this node"),
    (no_route_to_host_b_eth1, "reachable", f"to {COLLECTIVES_IP}:"),
    (other_code_on_host_b, "versions", "tensorfleet 0.1.0 (source "),
    (one_gpu_held_on_host_b, "placement", "1 of 2 GPUs free"),
], ids=["weights-absent-on-b", "interface-unreachable", "version-mismatch", "gpu-held-on-b"])
def test_doctor_names_the_broken_thing_and_serve_stops_on_it(hosts, cluster, chat_model_dir, breakage, check, detail):
    worker = hosts.hosts[1]
    with breakage(hosts, cluster, chat_model_dir) as model:
        config = serve_config(hosts, model, f"{check.replace(' ', '-')}.yaml")
        rc, out, seconds = run_on_head(hosts, cluster, f"doctor {config}", "doctor", timeout=120)
        print(f"\n[two hosts] {breakage.__name__}: doctor exit {rc} in {doctor_seconds(out):.1f}s "
              f"({seconds:.1f}s with the CLI's start)\n{out}")
        failed = [r for r in parse_table(out) if r["result"] == "fail"]
        named = [r for r in failed if r["check"] == check and r["node"].startswith(worker.ip) and detail in r["detail"]]
        assert rc == 1 and named and all(r["fix"] for r in failed), out
        assert doctor_seconds(out) < DOCTOR_DEADLINE_S, out

        rc, out, seconds = run_on_head(hosts, cluster, f"serve {config}", "serve", timeout=120)
        print(f"[two hosts] serve exit {rc} after {seconds:.1f}s")
        assert rc == 2 and "pass --skip-doctor" in out, out
        served = [r for r in parse_table(out) if r["result"] == "fail"]
        assert sorted(map(comparable, served)) == sorted(map(comparable, failed)), out

