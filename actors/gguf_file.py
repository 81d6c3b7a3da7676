"""Read one rank's slices of a GGUF file (llama.cpp's format) without reading the rest.

A GGUF file is a header (key/value metadata, then one info record per tensor: name, dims,
type, offset) followed by aligned tensor data. The file is memory-mapped (`gguf.GGUFReader`);
`GGUFTensor[rows]` / `GGUFTensor[:, cols]` copy out only the bytes of the blocks covering the
slice and dequantize them here, in torch, to float32.

Layout of a 2-D weight [out, in] (torch order; GGUF lists dims reversed, ne = [in, out]):
each row is stored contiguously as in/B blocks of S bytes (B elements per block):
    F32 B=1 S=4 | F16, BF16 B=1 S=2
    Q8_0 B=32 S=34: f16 d, 32 x int8 q               x = d * q
    Q4_0 B=32 S=18: f16 d, 16 bytes of nibbles       x = d * (q - 8)
    Q4_1 B=32 S=20: f16 d, f16 m, 16 bytes           x = d * q + m
In Q4 blocks byte j holds element j in its low nibble and element j + 16 in its high one.
Rows [a, b) are one contiguous byte range; columns [c, e) are blocks [c // B, ceil(e / B))
of every row, trimmed to [c, e) after dequantization.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message names the file and what to do."""


@dataclass
class ReadStats:
    """Raw (still quantized) bytes copied out of the file; the same record as the
    safetensors loader's, so either kind of checkpoint reports reads the same way."""

    bytes_read: int = 0
    largest_read: int = 0  # bytes of the largest single slice read

    def record(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.bytes_read += n
        self.largest_read = max(self.largest_read, n)


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block -> the block's f16 scale as float32, [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit values: low nibbles are elements 0-15, high 16-31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()


# Each decoder maps blocks [n, S] uint8 -> values [n, B] float32 with the same float32
# operations, in the same order, as gguf.quants (so results are bit-identical).
DECODERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.F32: lambda b: b.view(torch.float32),
    QType.F16: lambda b: b.view(torch.float16).float(),
    QType.BF16: lambda b: b.view(torch.bfloat16).float(),
    QType.Q8_0: lambda b: b[:, 2:].contiguous().view(torch.int8).float() * _half(b[:, :2]),
    QType.Q4_0: lambda b: _half(b[:, :2]) * (_nibbles(b[:, 2:]) - 8),
    QType.Q4_1: lambda b: _half(b[:, :2]) * _nibbles(b[:, 4:]) + _half(b[:, 2:4]),
}
SUPPORTED_TYPES = ", ".join(t.name for t in DECODERS)


def dequantize(raw: torch.Tensor, qtype: QType) -> torch.Tensor:
    """[rows, k*S] uint8 -> [rows, k*B] float32, every block of every row at once."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)
    return DECODERS[qtype](blocks).reshape(raw.shape[0], raw.shape[1] // size * block)


def slice_bounds(index: Any, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """`t[a:b]`, `t[:, a:b]`, `t[:]` -> one [start, stop) per dimension."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise IndexError(f"GGUF tensors take slices only (t[a:b], t[:, a:b], t[:]), got {index!r}")
    bounds = []
    for s, n in zip(index + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise IndexError(f"GGUF tensors take contiguous slices, got step {step}")
        bounds.append((start, max(start, stop)))
    return bounds


class GGUFTensor:
    """One tensor of a GGUF file, read only when sliced; a slice is float32."""

    def __init__(self, name: str, qtype: QType, shape: tuple[int, ...], raw: np.ndarray, stats: ReadStats):
        self.name, self.qtype, self.shape = name, qtype, shape
        self._raw = raw  # [rows, bytes per row] view of the memory map; 1-D tensors are one row
        self._stats = stats

    def __getitem__(self, index: Any) -> torch.Tensor:
        bounds = slice_bounds(index, self.shape)
        (r0, r1), (c0, c1) = bounds if len(bounds) == 2 else [(0, 1), *bounds]
        block, size = GGML_QUANT_SIZES[self.qtype]
        b0, b1 = c0 // block, -(-c1 // block)  # the blocks covering columns [c0, c1)
        # np.array copies: only these bytes are read, and the result never aliases the map.
        raw = torch.from_numpy(np.array(self._raw[r0:r1, b0 * size : b1 * size]))
        self._stats.record(raw)
        values = dequantize(raw, self.qtype)[:, c0 - b0 * block : c1 - b0 * block]
        return values if len(bounds) == 2 else values.reshape(c1 - c0)

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, {self.qtype.name}, shape={self.shape})"


class GGUFFile:
    """A GGUF file, validated when opened; tensors are looked up lazily by name."""

    def __init__(self, path: str | Path, stats: ReadStats | None = None):
        self.path = Path(path)
        self.stats = stats or ReadStats()
        _check_header(self.path)
        try:
            self._reader = GGUFReader(self.path)
            self.metadata: dict[str, Any] = {k: f.contents() for k, f in self._reader.fields.items()}
        except (ValueError, IndexError, KeyError, OverflowError) as e:
            # A cut anywhere, header or tensor data, fails here: the reader maps every
            # tensor's byte range, and a short one cannot take the tensor's shape.
            raise self.error(f"is truncated or corrupt ({e}); download it again") from e
        self._tensors = {t.name: t for t in self._reader.tensors}

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"GGUF file {self.path} {what}")

    def tensor(self, name: str) -> GGUFTensor:
        t = self._tensors.get(name)
        if t is None:
            raise self.error(f"has no tensor {name!r}; is it a complete model file of the expected architecture?")
        if problem := _unsupported(t):
            raise self.error(problem)
        shape = tuple(int(n) for n in reversed(t.shape))
        raw = self._reader.data[t.data_offset : t.data_offset + t.n_bytes]
        return GGUFTensor(name, t.tensor_type, shape, raw.reshape(shape[0] if len(shape) == 2 else 1, -1), self.stats)

    def check_supported(self) -> None:
        """Refuse a file with any tensor this reader cannot dequantize, naming all of them."""
        problems = [p for t in self._reader.tensors if (p := _unsupported(t))]
        if problems:
            raise self.error(f"has {len(problems)} unsupported tensor(s): " + "; ".join(problems[:8]))


def _unsupported(t: Any) -> str | None:
    if t.tensor_type not in DECODERS:
        return (f"tensor {t.name!r} has type {t.tensor_type.name}, which tensorfleet cannot dequantize "
                f"(supported: {SUPPORTED_TYPES}); use a file quantized to one of those")
    if len(t.shape) > 2:
        return f"tensor {t.name!r} has {len(t.shape)} dimensions; tensorfleet reads 1-D and 2-D tensors only"
    return None


def _check_header(path: Path) -> None:
    """Magic and version, checked before the reader so the error says which is wrong."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise GGUFError(f"GGUF file {path} cannot be opened ({e.strerror}); check the model path") from e
    if len(head) < 8 or head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); "
                        "point the model path at a .gguf file or a Hugging Face checkpoint directory")
    version = int.from_bytes(head[4:], "little")
    if version & 0xFFFF == 0:
        raise GGUFError(f"GGUF file {path} is big-endian; convert it with gguf-py's gguf_convert_endian.py")
    if version not in READER_SUPPORTED_VERSIONS:
        raise GGUFError(f"GGUF file {path} has version {version}; supported versions are "
                        f"{READER_SUPPORTED_VERSIONS}; re-convert it with a current llama.cpp")
