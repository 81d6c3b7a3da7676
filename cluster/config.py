"""The YAML a user writes (pydantic, vLLM's names).

```yaml
model: ./path/to/hf-dir          # config.json + safetensors + tokenizer files, or a .gguf file
served_model_name: my-model      # optional, default: the directory's (or file's) name
dtype: auto                      # auto | float32 | bfloat16 | float16
parallel: {tensor_parallel_size: 2, pipeline_parallel_size: 2, layer_partition: null,
           tensor_split: null, device: auto}
engine: {max_model_len: 2048, max_num_seqs: 64, max_num_batched_tokens: 4096, block_size: 16,
         num_kv_blocks: null, gpu_memory_utilization: 0.9, enable_prefix_caching: true,
         step_deadline_s: 30, max_resumes: 3}
serve: {host: 127.0.0.1, port: 8000, api_key: null, max_waiting_requests: 256,
        max_body_bytes: 1048576, graceful_shutdown_s: 30,
        num_replicas: 1,                 # model replicas behind the endpoint, each its own TP x PP workers
        autoscaling: null,               # or {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16,
                                         #      upscale_delay_s: 10, downscale_delay_s: 60} instead of num_replicas
        routing: prefix, max_load_imbalance: 8}
```

Every section forbids unknown keys and takes no coercion (`tensor_parallel_size: "2"` is an
error), so a typo never silently falls back to a default. `load_config` turns validation
errors into one `ConfigError` that names each field by its dotted YAML path. Checks that
need the model (heads vs tp, layers vs pp, max_model_len vs max_position_embeddings) live
in `cluster/plan.py`; the config alone cannot know them.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from actors.sharding import ShardingError, check_tensor_split

__all__ = [
    "AutoscalingConfig",
    "ConfigError",
    "EngineConfig",
    "ParallelConfig",
    "ServeConfig",
    "TensorfleetConfig",
    "load_config",
    "cpu_has_native_bf16",
    "resolve_device",
    "resolve_dtype",
]

API_KEY_ENV = "TENSORFLEET_API_KEY"
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo flags of CPUs with bf16 matmul units


class ConfigError(ValueError):
    """The user's config (or the model directory it names) is wrong; the message says where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ParallelConfig(_Section):
    tensor_parallel_size: int = Field(1, gt=0)
    pipeline_parallel_size: int = Field(1, gt=0)
    # Layers per pipeline stage; null splits them as evenly as possible. Checked against
    # the model by cluster/plan.py, the one layout validator.
    layer_partition: list[Annotated[int, Field(gt=0)]] | None = None
    # One positive weight per TP rank, its share of the heads and MLP columns (like
    # llama.cpp's --tensor-split), e.g. [24, 16] for a 24 GB GPU beside a 16 GB one;
    # null splits them as evenly as possible.
    tensor_split: list[float] | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"

    @field_validator("tensor_split")
    @classmethod
    def _one_weight_per_rank(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        tp = info.data.get("tensor_parallel_size")
        if tp is not None:  # else tensor_parallel_size itself is invalid, and reported
            try:
                check_tensor_split(tp, weights)
            except ShardingError as e:
                raise ValueError(str(e)) from None
        return weights


class EngineConfig(_Section):
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(4096, gt=0)
    block_size: int = Field(16, gt=0)
    num_kv_blocks: int | None = Field(None, gt=0)  # None: sized by the plan from device memory
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    step_deadline_s: float = Field(30.0, gt=0)  # a longer step means a stuck worker
    # A request resumes on rebuilt workers after a worker failure; one caught by more
    # failures than this fails (a request that keeps meeting failures may be their cause).
    max_resumes: int = Field(3, ge=0)


class AutoscalingConfig(_Section):
    """Ray Serve's autoscaling of the model replicas (its field names): between min and
    max replicas, aiming at `target_ongoing_requests` requests per replica."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)  # load above target this long adds replicas
    downscale_delay_s: float = Field(60.0, ge=0)  # load below target this long removes them
    look_back_period_s: float = Field(10.0, gt=0)  # the window the load is averaged over

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        return self


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    api_key: str | None = None
    max_waiting_requests: int = Field(256, gt=0)
    max_body_bytes: int = Field(1_048_576, gt=0)
    # On SIGTERM / Ctrl-C: stop taking requests, let running ones finish for up to this long
    graceful_shutdown_s: float = Field(30.0, ge=0)
    # Model replicas behind the one endpoint, each with its own TP x PP workers: a fixed
    # count, or `autoscaling` (then num_replicas stays unset).
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    # prefix: to the replica most likely to hold the prompt's KV blocks (deploy/server/router.py),
    # unless its in-flight requests exceed the least loaded replica's by more than
    # max_load_imbalance; power_of_two: Serve's default (the less loaded of two random replicas).
    routing: Literal["prefix", "power_of_two"] = "prefix"
    max_load_imbalance: int = Field(8, ge=0)

    @model_validator(mode="after")
    def _one_replica_count(self) -> "ServeConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self

    @property
    def max_replicas(self) -> int:
        """The most model replicas this config may run at once (what must fit the cluster)."""
        if self.autoscaling is not None:
            return self.autoscaling.max_replicas
        return self.num_replicas or 1

    def effective_api_key(self) -> str | None:
        """`api_key` from the YAML, else env TENSORFLEET_API_KEY, else None (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class TensorfleetConfig(_Section):
    model: str = Field(min_length=1)
    served_model_name: str = ""  # "" (or omitted): the model directory's name, or the GGUF file's
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    parallel: ParallelConfig = ParallelConfig()
    engine: EngineConfig = EngineConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("served_model_name"):
            model = data.get("model")
            if isinstance(model, str) and model:
                name = Path(os.path.abspath(model)).name.removesuffix(".gguf")
                data = {**data, "served_model_name": name}
        return data


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {_field_path(e['loc'])}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, default_model: Callable[[], os.PathLike] | None = None) -> TensorfleetConfig:
    """Read and validate a YAML config; a relative `model:` is relative to the YAML's folder.
    Without `model:`, `default_model()` names it when given."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (model:, parallel:, ...)")
    if "model" not in data and default_model is not None:
        data["model"] = str(default_model())
    model = data.get("model")
    if isinstance(model, str) and model and not os.path.isabs(model):
        data["model"] = os.path.normpath(Path(os.path.abspath(path)).parent / model)
    try:
        return TensorfleetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


def resolve_device(device: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from the
    kernel's CPU flags; False where they cannot be read (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(NATIVE_BF16_FLAGS.intersection(flags))


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The model's compute dtype. `auto`: bfloat16 on CUDA; on CPU bfloat16 where the CPU
    has native bf16 (a 1-row bf16 matmul reads half the bytes and runs ~2x faster than
    float32 there), float32 elsewhere (emulated bf16 is slower than float32). The driver
    decides for every worker: the nodes of a replica are assumed to share a CPU model."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if resolve_device(device) == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32
