"""What `model:` names, and the one place that knows how each kind of checkpoint is read.

- A Hugging Face folder: config.json (the shape), model.safetensors or an index and its
  shards (each rank slices its own rows or columns with `safe_open(...).get_slice`),
  tokenizer files, generation_config.json.
- A GGUF file (llama.cpp's), or a folder holding exactly one: its metadata is the config,
  the tokenizer and the chat template; each rank dequantizes only the quant blocks its
  slices cover (actors/gguf_file.py, Llama names and rope rows in actors/gguf_llama.py).

Both answer the same questions, so nothing above this module asks which kind it has:
`shape`, `tensors()` (Hugging Face names, read lazily), `check_complete()` (every tensor
the model needs is there: before any worker starts), `eos_token_ids()`, and
`transformers_args()` (how transformers opens the same checkpoint: the tokenizer and
chat template, and `tensorfleet verify`'s reference model).
"""

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from actors.gguf_file import GGUFFile
from actors.gguf_llama import architecture, gguf_name, hf_tensors, llama_hf_config
from actors.loader import CheckpointError, ReadStats, load_into
from actors.model_shape import ModelShape
from actors.models.llama import checkpoint_names


class Checkpoint:
    """What every kind of checkpoint answers; `path` is the folder or the file served."""

    path: Path
    shape: ModelShape
    stats: ReadStats

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """(Hugging Face name, lazy tensor): slicing one reads only the slice's bytes."""
        raise NotImplementedError

    def tensor_names(self) -> Iterable[str]:
        """Hugging Face names of the tensors stored, read from headers only."""
        raise NotImplementedError

    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a generation, as the checkpoint declares them (may be empty)."""
        raise NotImplementedError

    def transformers_args(self) -> tuple[str, dict[str, str]]:
        """`from_pretrained(*args)` opens the same model or tokenizer in transformers."""
        raise NotImplementedError

    def incomplete(self, missing: list[str]) -> CheckpointError:
        raise NotImplementedError

    def rank_files(self) -> list[Path]:
        """Every file a rank opens to load its part (what each node must be able to read)."""
        raise NotImplementedError

    def check_complete(self) -> None:
        """Refuse a checkpoint that lacks a tensor the whole model needs (no tensor is read)."""
        if missing := sorted(checkpoint_names(self.shape) - set(self.tensor_names())):
            raise self.incomplete(missing)


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path, stats: ReadStats):
        self.path, self.stats = path, stats
        self.shape = ModelShape.from_dir(path)

    def rank_files(self) -> list[Path]:
        return [self.path / "config.json", *self.files()]

    def files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.path / f for f in sorted(set(weight_map.values()))]
        single = self.path / "model.safetensors"
        if single.exists():
            return [single]
        raise CheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {self.path}; tensorfleet loads "
            "Hugging Face safetensors checkpoints and GGUF files"
        )

    def tensors(self) -> Iterator[tuple[str, Any]]:
        for path in self.files():
            with _safe_open(path) as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name), self.stats)

    def tensor_names(self) -> Iterator[str]:
        for path in self.files():
            with _safe_open(path) as f:
                yield from f.keys()

    def eos_token_ids(self) -> tuple[int, ...]:
        """From generation_config.json, else config.json."""
        for name in ("generation_config.json", "config.json"):
            path = self.path / name
            if path.exists() and (eos := json.loads(path.read_text()).get("eos_token_id")) is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
        return ()

    def transformers_args(self) -> tuple[str, dict[str, str]]:
        return str(self.path), {}

    def incomplete(self, missing: list[str]) -> CheckpointError:
        return CheckpointError(f"the safetensors files in {self.path} lack {len(missing)} tensor(s) the model "
                               f"needs: {', '.join(missing[:8])}; download or save the checkpoint again")


class LazyTensor:
    """A safetensors tensor that is read only when sliced."""

    def __init__(self, safe_slice: Any, stats: ReadStats):
        self._slice = safe_slice
        self._stats = stats
        self.shape = tuple(safe_slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self._slice[index]
        self._stats.record(t)
        return t


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from None


class GGUFCheckpoint(Checkpoint):
    """Validated when opened (only the header is read): a Llama-family architecture, tensor
    types this reader dequantizes, and every tensor the model needs."""

    def __init__(self, path: Path, stats: ReadStats):
        self.path, self.stats = path, stats
        self.file = GGUFFile(path, stats)  # a truncated or corrupt file fails here
        architecture(self.file)
        self.file.check_supported()
        self.config = llama_hf_config(self.file)  # the config.json of the same model
        self.shape = ModelShape.from_dict(self.config, source=str(path))
        self.check_complete()

    def rank_files(self) -> list[Path]:
        return [self.path]

    def tensors(self) -> Iterator[tuple[str, Any]]:
        return hf_tensors(self.file)

    def tensor_names(self) -> Iterator[str]:
        return (name for name, _ in hf_tensors(self.file))

    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence token and, where the file names one, the end-of-turn token."""
        md = self.file.metadata
        ids = (md.get("tokenizer.ggml.eos_token_id"), md.get("tokenizer.ggml.eot_token_id"))
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def transformers_args(self) -> tuple[str, dict[str, str]]:
        return str(self.path.parent), {"gguf_file": self.path.name}

    def incomplete(self, missing: list[str]) -> CheckpointError:
        names = ", ".join(gguf_name(n) for n in missing[:8])
        return self.file.error(f"lacks {len(missing)} tensor(s) the model needs: {names}; the file is "
                               "incomplete: download it again, or convert the model again with llama.cpp")


def open_checkpoint(model: str | os.PathLike, stats: ReadStats | None = None) -> Checkpoint:
    """The checkpoint `model:` names: a .gguf file, a folder holding one, or a Hugging Face
    folder (config.json). Opening reads only configs and headers."""
    path, stats = Path(model), stats or ReadStats()
    if path.is_file():
        return GGUFCheckpoint(path, stats)  # not a GGUF: its header check says so
    if not path.is_dir():
        raise CheckpointError(f"model: {path} does not exist; name a Hugging Face model folder, a .gguf file "
                              "or a folder holding one")
    ggufs = sorted(path.glob("*.gguf"))
    if (path / "config.json").exists() or not ggufs:
        return HFCheckpoint(path, stats)  # without config.json: the shape's error names it
    if len(ggufs) > 1:
        raise CheckpointError(f"model: {path} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); "
                              "name one of them in model:")
    return GGUFCheckpoint(ggufs[0], stats)


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> ReadStats:
    """Read `model`'s slices (one rank's) of the checkpoint at `path`; what was read."""
    checkpoint = open_checkpoint(path)
    load_into(model, checkpoint.tensors())
    return checkpoint.stats
