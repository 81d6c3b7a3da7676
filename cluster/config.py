"""The YAML a user writes (pydantic, vLLM's names) and the model shape read from config.json.

```yaml
model: ./path/to/hf-dir          # config.json + safetensors + tokenizer files
served_model_name: my-model      # optional, default: the directory name
dtype: auto                      # auto | float32 | bfloat16 | float16
parallel: {tensor_parallel_size: 2, pipeline_parallel_size: 2, layer_partition: null, device: auto}
engine: {max_model_len: 2048, max_num_seqs: 64, max_num_batched_tokens: 4096, block_size: 16,
         num_kv_blocks: null, gpu_memory_utilization: 0.9, enable_prefix_caching: true,
         step_deadline_s: 30, executor: plain}
serve: {host: 127.0.0.1, port: 8000, api_key: null, max_waiting_requests: 256,
        max_body_bytes: 1048576, graceful_shutdown_s: 30}
```

`ModelShape` is what the planner and the layers read from the model's config.json.

Every section forbids unknown keys and takes no coercion (`tensor_parallel_size: "2"` is an
error), so a typo never silently falls back to a default. `load_config` turns validation
errors into one `ConfigError` that names each field by its dotted YAML path. Checks that
need the model (heads vs tp, layers vs pp, max_model_len vs max_position_embeddings) live
in `cluster/plan.py`; the config alone cannot know them.
"""

import json
import os
from dataclasses import dataclass
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

__all__ = [
    "ConfigError",
    "EngineConfig",
    "ModelShape",
    "ParallelConfig",
    "ServeConfig",
    "TensorfleetConfig",
    "load_config",
    "resolve_device",
    "resolve_dtype",
]

API_KEY_ENV = "TENSORFLEET_API_KEY"


class ConfigError(ValueError):
    """The user's config (or the model directory it names) is wrong; the message says where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ParallelConfig(_Section):
    tensor_parallel_size: int = Field(1, gt=0)
    pipeline_parallel_size: int = Field(1, gt=0)
    # Layers per pipeline stage; null splits them as evenly as possible.
    layer_partition: list[Annotated[int, Field(gt=0)]] | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"

    @field_validator("layer_partition")
    @classmethod
    def _one_entry_per_stage(cls, part: list[int] | None, info: ValidationInfo) -> list[int] | None:
        pp = info.data.get("pipeline_parallel_size")
        if part is not None and pp is not None and len(part) != pp:
            raise ValueError(
                f"{part} has {len(part)} entries but pipeline_parallel_size={pp}; "
                "give one layer count per stage"
            )
        return part


class EngineConfig(_Section):
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(4096, gt=0)
    block_size: int = Field(16, gt=0)
    num_kv_blocks: int | None = Field(None, gt=0)  # None: size from free memory
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    step_deadline_s: float = Field(30.0, gt=0)  # a longer step means a stuck worker
    # compiled: ~5x less per-step overhead, but in Ray 2.60 a worker dying mid-step can
    # crash its node's raylet (ray-project/ray#63229), which turns a recoverable worker
    # failure into a lost node; plain survives it, so it is the default. Its channel waits
    # also keep CPU busy: on a 2-core CPU machine tp=2 ran at 67 output tok/s with it, 114
    # without (the benchmark workload).
    executor: Literal["plain", "compiled"] = "plain"


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    api_key: str | None = None
    max_waiting_requests: int = Field(256, gt=0)
    max_body_bytes: int = Field(1_048_576, gt=0)
    # On SIGTERM / Ctrl-C: stop taking requests, let running ones finish for up to this long
    graceful_shutdown_s: float = Field(30.0, ge=0)

    def effective_api_key(self) -> str | None:
        """`api_key` from the YAML, else env TENSORFLEET_API_KEY, else None (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class TensorfleetConfig(_Section):
    model: str = Field(min_length=1)
    served_model_name: str = ""  # "" (or omitted): the model directory's name
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
                data = {**data, "served_model_name": Path(os.path.abspath(model)).name}
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


def load_config(path: str | os.PathLike) -> TensorfleetConfig:
    """Read and validate a YAML config; a relative `model:` is relative to the YAML's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (model:, parallel:, ...)")
    model = data.get("model")
    if isinstance(model, str) and model and not os.path.isabs(model):
        data["model"] = os.path.normpath(Path(os.path.abspath(path)).parent / model)
    try:
        return TensorfleetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Hugging Face's defaults when config.json leaves max_position_embeddings out.
_DEFAULT_MAX_POSITIONS = {
    "LlamaForCausalLM": 2048,
    "MistralForCausalLM": 4096 * 32,
    "Qwen2ForCausalLM": 32768,
}


@dataclass(frozen=True)
class ModelShape:
    """What the planner and the layers need from a Hugging Face config.json.

    head_dim defaults to hidden_size / num_attention_heads and num_key_value_heads to
    num_attention_heads (no GQA). Qwen2 always has q/k/v biases (its config.json does not
    say so); Llama's `attention_bias: true` biases q/k/v and o_proj. `sliding_window` is the
    window in tokens when the model uses one (Mistral v0.1; Qwen2 only with
    use_sliding_window, from layer `max_window_layers` on), else None.
    """

    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str
    attention_bias: bool  # q/k/v projections have a bias
    o_proj_bias: bool  # the attention output projection has a bias
    sliding_window: int | None = None
    max_window_layers: int | None = None

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ModelShape":
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(
                f"model: {path} is not a directory (expected a Hugging Face model folder)"
            )
        return cls.from_json(path / "config.json")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelShape":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"model: {path} does not exist; the model folder needs the Hugging Face "
                "config.json (weights are only needed to serve, not to plan)"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model: {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelShape":
        archs = tuple(cfg.get("architectures") or ())
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"model: {source} has architectures {list(archs)}; tensorfleet supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            vocab, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
            layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ConfigError(f"model: {source} lacks {e.args[0]}") from None
        head_dim = cfg.get("head_dim") or hidden // heads
        if not cfg.get("head_dim") and hidden % heads:
            raise ConfigError(
                f"model: {source}: num_attention_heads={heads} does not divide "
                f"hidden_size={hidden} and no head_dim is given"
            )
        is_qwen2 = arch == "Qwen2ForCausalLM"
        window = cfg.get("sliding_window")
        if is_qwen2 and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            architectures=(arch, *(a for a in archs if a != arch)),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(
                cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch]
            ),
            # transformers >= 4.56 writes "dtype"; older checkpoints "torch_dtype".
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            attention_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_proj_bias=not is_qwen2 and bool(cfg.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            max_window_layers=cfg.get("max_window_layers") if is_qwen2 and window else None,
        )


def resolve_device(device: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, shape: ModelShape, device: str) -> torch.dtype:
    """`auto`: the checkpoint's torch_dtype on cuda, float32 on cpu (CPU half math is slow
    and partly missing); otherwise the named dtype."""
    if dtype == "auto":
        name = shape.torch_dtype if resolve_device(device) == "cuda" else "float32"
    else:
        name = dtype
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise ConfigError(f"dtype: unknown dtype {name!r} (from the model's config.json)")
    return result
