"""Fill one rank's parameters from a checkpoint's tensors, reading only the rank's slices.

A checkpoint (actors/checkpoint.py: safetensors or GGUF) yields (Hugging Face name, lazy
tensor) pairs; a lazy tensor reads its bytes only when sliced. A parameter's
`weight_loader` slices out the rows or columns its rank owns, so only those bytes are
read; tensors of other stages are never touched. `ReadStats` counts what was read, so
tests can show that a rank never materialises a matrix it does not own.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actors.layers import WeightShapeError


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is (unreadable, incomplete, or not matching
    its config); the message names the file or the tensor and what to do."""


@dataclass
class ReadStats:
    """Bytes copied out of the checkpoint's files, as stored (still quantized in a GGUF)."""

    bytes_read: int = 0
    largest_read: int = 0  # bytes of the largest single slice read

    def record(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.bytes_read += n
        self.largest_read = max(self.largest_read, n)


def load_into(model: nn.Module, tensors: Iterator[tuple[str, Any]]) -> None:
    """Copy this rank's slices of `tensors` into `model`'s parameters.

    The model says which checkpoint tensors it holds (`checkpoint_target`) and which
    projections it fuses (`fused_projections`: checkpoint projection -> (fused, shard id));
    every parameter's own weight_loader does the slicing.
    """
    params = dict(model.named_parameters())
    needed = _needed_tensors(model)
    for name, source in tensors:
        target = _parameter_for(model, name)
        if target is None:
            continue
        pname, shard_id = target
        if pname not in params:
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in this model (is its config right?)")
        param = params[pname]
        try:
            param.weight_loader(param, source, shard_id)
        except WeightShapeError as e:
            raise CheckpointError(f"checkpoint tensor {name!r}: {e}; check the config against the weights") from None
        needed.pop(target, None)
    if needed:
        missing = sorted(needed.values())
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) this rank needs: {', '.join(missing[:8])}")


def _parameter_for(model: nn.Module, name: str) -> tuple[str, Any] | None:
    """(parameter name, shard id) that checkpoint tensor `name` fills on this rank, or None."""
    target = model.checkpoint_target(name)
    if target is None:
        return None
    *prefix, proj, kind = target.split(".")
    if proj in model.fused_projections:
        fused_name, shard_id = model.fused_projections[proj]
        return ".".join([*prefix, fused_name, kind]), shard_id
    return target, None


def _needed_tensors(model: nn.Module) -> dict[tuple[str, Any], str]:
    """(parameter, shard id) -> the checkpoint name that fills it, for every parameter."""
    fused = model.fused_projections
    needed = {}
    for pname, _ in model.named_parameters():
        *prefix, module, kind = pname.split(".")
        parts = [(proj, s) for proj, (f, s) in fused.items() if f == module]
        for proj, shard_id in parts or [(module, None)]:
            needed[(pname, shard_id)] = ".".join([*prefix, proj, kind])
    return needed
