"""Load one rank's shard of a Hugging Face safetensors checkpoint.

Tensors are opened lazily (`safe_open(...).get_slice`): a parameter's `weight_loader`
slices out the rows or columns its rank owns and only those bytes are read. Tensors of
other stages are never opened. `ReadStats` counts what was read, so tests can show that a
rank never materialises a matrix it does not own.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from actors.checkpoint_files import CheckpointError, checkpoint_files
from actors.layers import WeightShapeError


@dataclass
class ReadStats:
    bytes_read: int = 0
    largest_read: int = 0  # bytes of the largest single slice read

    def record(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.bytes_read += n
        self.largest_read = max(self.largest_read, n)


class LazyTensor:
    """A checkpoint tensor that is read only when sliced."""

    def __init__(self, safe_slice: Any, stats: ReadStats):
        self._slice = safe_slice
        self._stats = stats
        self.shape = tuple(safe_slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self._slice[index]
        self._stats.record(t)
        return t


def iter_checkpoint(model_dir: Path, stats: ReadStats) -> Iterator[tuple[str, LazyTensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, LazyTensor(f.get_slice(name), stats)


def load_into(model: nn.Module, tensors: Iterator[tuple[str, Any]]) -> None:
    """Copy this rank's slices of `tensors` into `model`'s parameters.

    The model says which checkpoint tensors it holds (`checkpoint_target`) and which
    projections it fuses (`fused_projections`: checkpoint projection -> (fused, shard id));
    every parameter's own weight_loader does the slicing.
    """
    params = dict(model.named_parameters())
    fused = model.fused_projections
    needed = _needed_tensors(params, fused)
    for name, source in tensors:
        target = model.checkpoint_target(name)
        if target is None:
            continue
        *prefix, proj, kind = target.split(".")
        pname, shard_id = target, None
        if proj in fused:
            fused_name, shard_id = fused[proj]
            pname = ".".join([*prefix, fused_name, kind])
        if pname not in params:
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in this model (is config.json right?)")
        param = params[pname]
        try:
            param.weight_loader(param, source, shard_id)
        except WeightShapeError as e:
            raise CheckpointError(f"checkpoint tensor {name!r}: {e}; check config.json against the weights") from None
        needed.pop((pname, shard_id), None)
    if needed:
        missing = sorted(needed.values())
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) this rank needs: {', '.join(missing[:8])}")


def _needed_tensors(params: dict[str, nn.Parameter], fused: dict[str, tuple[str, Any]]) -> dict[tuple[str, Any], str]:
    """(parameter, shard id) -> the checkpoint name that fills it, for every parameter."""
    needed = {}
    for pname in params:
        *prefix, module, kind = pname.split(".")
        parts = [(proj, s) for proj, (f, s) in fused.items() if f == module]
        for proj, shard_id in parts or [(module, None)]:
            needed[(pname, shard_id)] = ".".join([*prefix, proj, kind])
    return needed


def load_checkpoint(model: nn.Module, model_dir: str | Path) -> ReadStats:
    stats = ReadStats()
    load_into(model, iter_checkpoint(Path(model_dir), stats))
    return stats
