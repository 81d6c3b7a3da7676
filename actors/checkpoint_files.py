"""Which files of a Hugging Face safetensors checkpoint every rank opens.

Kept apart from `actors.loader` (which needs torch) so that a node's preflight check
(`cluster.node_facts`) asks the same question without importing torch.
"""

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir}; "
        "tensorfleet loads Hugging Face safetensors checkpoints"
    )
