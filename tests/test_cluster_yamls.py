"""The `ray up` cluster YAMLs and the Serve config under deploy/clusters/, checked offline
with Ray's own code: the autoscaler's `prepare_config` + `validate_config` (what `ray up`
runs before it touches a cloud) and Serve's `ServeDeploySchema` (what `serve deploy` runs)."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CLUSTERS = DEPLOY / "clusters"
CLUSTER_YAMLS = ("aws.yaml", "gcp.yaml", "local.yaml")
CLOUD_YAMLS = ("aws.yaml", "gcp.yaml")
VENV_BIN = "~/tensorfleet-venv/bin/"
COMMAND_LISTS = ("setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def commands(config: dict, *lists: str) -> list[str]:
    return [cmd for key in (lists or COMMAND_LISTS) for cmd in config.get(key, [])]


def test_every_cluster_yaml_is_checked():
    assert sorted(p.name for p in CLUSTERS.glob("*.yaml")) == sorted([*CLUSTER_YAMLS, "serve.yaml"])


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_ray_accepts_the_cluster_yaml(name):
    prepared = prepare_config(load(name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validation_is_not_a_formality():
    config = copy.deepcopy(load("aws.yaml"))
    config["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_node_types(name):
    """A CPU-only head (no GPU worker lands there) and 8-GPU worker node types."""
    config = load(name)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = [t for n, t in types.items() if n != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    # tp=8 x pp=2 (Llama-3.1-405B) needs two GPU nodes at once.
    assert all(t["max_workers"] >= 2 for t in gpu_types) and config["max_workers"] >= 2


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_commands_install_tensorfleet_and_start_ray_with_token_auth(name):
    config = load(name)
    setup = " ".join(commands(config, "setup_commands", "head_setup_commands", "worker_setup_commands"))
    assert "pip install" in setup and "-e ~/tensorfleet" in setup and "torch==" in setup
    assert config["file_mounts"]["~/tensorfleet"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1 and "export RAY_AUTH_MODE=token" in start[0]
    assert "--head" in " ".join(config["head_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_ray_is_called_by_absolute_path(name):
    """Commands run in a login shell whose PATH lacks the venv: a bare `ray` would be
    another Ray, or none."""
    for cmd in commands(load(name)):
        for m in re.finditer(r"(\S*)\bray (start|stop)\b", cmd):
            assert m.group(1) == VENV_BIN, f"{name}: {cmd!r} calls ray without {VENV_BIN}"


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_no_yaml_runs_ray_stop(name):
    """`ray stop` ends every Ray process on a machine, not only ours."""
    assert not any(re.search(r"\bray stop\b", cmd) for cmd in commands(load(name)))


def test_cloud_restarts_end_only_their_own_ray():
    for name in ("aws.yaml", "gcp.yaml"):
        config = load(name)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            stop, start = config[key]
            assert "pkill" in stop and "/tmp/tensorfleet-ra[y]/" in stop  # [y]: not the shell running pkill
            assert "--temp-dir=/tmp/tensorfleet-ray" in start


def test_on_premises_yaml_starts_ray_explicitly():
    config = load("local.yaml")
    start = " ".join(commands(config, "head_start_ray_commands", "worker_start_ray_commands"))
    # Addresses and temp dirs are explicit on every node (see the YAML's comments).
    assert start.count("--node-ip-address=$NODE_IP") == 2
    assert start.count("--temp-dir=/tmp/tf-ray-$NODE_IP") == 2


def test_serve_config_is_a_valid_serve_deploy_file():
    schema = ServeDeploySchema.model_validate(load("serve.yaml"))
    (app,) = schema.applications
    assert app.import_path == "deploy.server.app:build_app"
    assert schema.http_options.host == "127.0.0.1"
    # The config it names (on the cluster, under ~/tensorfleet) is one of the shipped ones.
    shipped = Path(app.args["config"]).relative_to("/home/ubuntu/tensorfleet")
    assert (DEPLOY.parent / shipped).is_file()
