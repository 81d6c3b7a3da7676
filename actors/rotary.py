"""Rotary position embedding (RoPE), neox layout, with Llama-3 and linear scaling.

For a head vector x of width d, pair dimension j with j + d/2 and rotate the pair by angle
pos * f_j, f_j = theta^(-2j/d): x' = x * cos + rotate_half(x) * sin. Angles are computed in
float32 once for all positions, then cast to the activation dtype as Hugging Face does.
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inverse_frequencies(head_dim, rope))
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `positions`, [tokens, 1, d]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [tokens, heads, d], k: [tokens, kv_heads, d], rope: `RotaryEmbedding(positions)`."""
    cos, sin = rope
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
