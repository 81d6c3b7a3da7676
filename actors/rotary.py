"""Rotary position embedding (RoPE), neox layout, with Llama-3 and linear scaling.

For a head vector x of width d, pair dimension j with j + d/2 and rotate the pair by angle
pos * f_j, f_j = theta^(-2j/d): x' = x * cos + rotate_half(x) * sin. Angles are computed in
float32 once for all positions, then cast to the model dtype as Hugging Face does.
Positions are absolute, so the same table serves every rank and every stage.
"""

import math

import torch
from torch import nn


def inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """`rope` is `ModelShape.rope`, whose type the shape has already checked."""
    rope_type = rope["rope_type"]
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        return llama3_scaled(inv_freq, rope)
    return inv_freq


def llama3_scaled(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin of every position's angles, in the model dtype, looked up once per step.

    The sign of rotate_half is folded into the sin table: rotate_half(x) * sin =
    roll(x, d/2) * [-sin_lo | sin_hi], so a rotation costs one roll, two multiplies and an
    add, and negating is exact, so the result is bit-for-bit Hugging Face's."""

    def __init__(self, head_dim: int, max_positions: int, rope: dict, dtype: torch.dtype):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inverse_frequencies(head_dim, rope))
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        sin = angles.sin()
        sin[:, : head_dim // 2].neg_()
        # [max_positions, 2, d]: one gather per step fetches both; cast like HF's (float32 -> dtype)
        self.register_buffer("table", torch.stack((angles.cos(), sin), dim=1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for `positions`, each [tokens, 1, d]: used by every layer of the step."""
        rows = self.table.index_select(0, positions)
        return rows[:, 0:1], rows[:, 1:2]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [tokens, heads, d] (query and key heads side by side: one call rotates both)."""
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
