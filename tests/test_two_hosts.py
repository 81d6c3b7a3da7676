"""A real two-host deployment: `ray up` with deploy/clusters/local.yaml brings up a head on
host A and a worker on host B (network namespaces with their own sshd, tests/two_hosts.py),
each declaring 2 logical GPUs; `tensorfleet serve --address` (run on host A through
`ray exec`) serves a small model at tp=2 x pp=2, one pipeline stage per host, the TP groups
and the stage-to-stage edge over gloo on the namespaces' addresses; an HTTP request from
this process gets Hugging Face's greedy tokens; `ray down` stops the cluster.

Only the site-specific fields of the shipped YAML are replaced (addresses, SSH user and
key, where the auth token comes from); its setup and start commands run as written. Each
host's ~/.bashrc stands in for its hardware (2 logical GPUs) and points ~/tensorfleet-venv
at this checkout's venv, which the setup command then finds installed.
"""

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.two_hosts import TwoHosts, namespaces_unavailable

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
"""


def ray_temp_dirs(hosts: TwoHosts) -> list[Path]:
    """Where local.yaml's start commands put each node's Ray session (--temp-dir)."""
    return [Path(f"/tmp/tf-ray-{h.ip}") for h in hosts.hosts]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"the two-host test makes its hosts as network namespaces, and {reason}")
    missing = [tool for tool in ("/usr/sbin/sshd", "/usr/bin/rsync", "/usr/bin/ssh-keygen")
               if not os.path.exists(tool)]
    assert not missing, f"{missing} not installed: run `bash .ci/system-packages` (as root)"
    hosts = TwoHosts.start(tmp_path_factory.mktemp("two-hosts"), HOST_BASHRC,
                           {"tensorfleet-venv": REPO / ".venv"})
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


def test_ray_up_serves_tp2_pp2_across_two_hosts(hosts, chat_model_dir):
    head, worker = hosts.hosts
    config = cluster_yaml(hosts)
    serve_config = hosts.workdir / "tensorfleet.yaml"
    serve_config.write_text(yaml.safe_dump({
        "model": str(chat_model_dir), "served_model_name": MODEL, "dtype": "float32",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "device": "cpu"},
        "engine": {"max_model_len": 512, "num_kv_blocks": 128, "max_num_seqs": 8},
        "serve": {"host": head.ip, "port": PORT},
    }))
    url = f"http://{head.ip}:{PORT}"
    serve_log = head.home / "serve.log"
    timings: dict[str, float] = {}

    start = time.perf_counter()
    ray_cli(hosts, "up", "-y", "--no-config-cache", str(config), timeout=240)
    timings["ray up"] = time.perf_counter() - start
    timings["worker joined"] = wait_for(
        "host B's raylet", lambda: any("raylet" in c for c in hosts.processes(worker)), 120)

    # The driver runs on the head, as a user's would (`ray exec` / `ray attach`), with the
    # cluster's token (~/.ray/auth_token there): Ray sends it only in token mode.
    start = time.perf_counter()
    ray_cli(hosts, "exec", str(config),
            f"RAY_AUTH_MODE=token nohup ~/tensorfleet-venv/bin/tensorfleet serve {serve_config} "
            f"--address {head.ip}:6379 > ~/serve.log 2>&1 < /dev/null &", timeout=60)

    def serving() -> bool:
        if not any("tensorfleet serve" in c for c in hosts.processes(head)):
            raise RuntimeError(f"tensorfleet serve exited on host A:\n{serve_log.read_text()[-4000:]}")
        return healthy(url)

    wait_for("the served model's /health", serving, 300, diagnose=lambda: serve_log.read_text()[-4000:])
    timings["deploy + model load"] = time.perf_counter() - start

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

    start = time.perf_counter()
    ray_cli(hosts, "down", "-y", str(config), timeout=120)
    timings["ray down"] = time.perf_counter() - start
    assert not any("gcs_server" in c or "raylet" in c for c in hosts.processes(head))
    print("[two hosts] " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
