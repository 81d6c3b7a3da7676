"""Read one rank's slices of a GGUF file (llama.cpp's format) without reading the rest.

A GGUF file is a header (key/value metadata, then one info record per tensor: name, dims,
type, offset) followed by aligned tensor data. The header is parsed here in one pass (a
~100 MB model's header, 100k tokenizer strings included, in a fraction of a second: each
rank opens the file itself); the data stays memory-mapped, and `GGUFTensor[rows]` /
`GGUFTensor[:, cols]` copy out only the bytes of the blocks covering the slice and
dequantize them here, in torch, to float32.

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

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from actors.loader import CheckpointError, ReadStats


class GGUFError(CheckpointError):
    """A GGUF file that cannot be served; the message names the file and what to do."""


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
WHAT_TO_DO = f"tensorfleet reads {SUPPORTED_TYPES} (1-D and 2-D tensors): use a file quantized to one of those"


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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: QType | int  # an int: a type code this gguf package does not know
    shape: tuple[int, ...]  # torch order
    offset: int  # of its first byte in the file
    n_bytes: int


class GGUFFile:
    """A GGUF file, validated when opened; tensors are looked up lazily by name."""

    def __init__(self, path: str | Path, stats: ReadStats | None = None):
        self.path = Path(path)
        self.stats = stats or ReadStats()
        _check_header(self.path)
        with self.path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, infos = _parse_header(self._map)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
            raise self.error(f"is truncated or corrupt ({type(e).__name__}: {e}); download it again") from e
        if short := [t.name for t in infos if t.offset + t.n_bytes > len(self._map)]:
            raise self.error(f"is truncated or corrupt (the data of tensor(s) {', '.join(short[:3])} runs past "
                             f"the end of the file at byte {len(self._map)}); download it again")
        self._tensors = {t.name: t for t in infos}

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
            raise self.error(f"has a {problem}; {WHAT_TO_DO}")
        raw = np.frombuffer(self._map, np.uint8, t.n_bytes, t.offset)
        return GGUFTensor(name, t.qtype, t.shape, raw.reshape(t.shape[0] if len(t.shape) == 2 else 1, -1), self.stats)

    def check_supported(self) -> None:
        """Refuse a file with any tensor this reader cannot dequantize, naming all of them."""
        problems = [p for t in self._tensors.values() if (p := _unsupported(t))]
        if problems:
            listed = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise self.error(f"has {len(problems)} unsupported tensor(s): {listed}; {WHAT_TO_DO}")


def _unsupported(t: TensorInfo) -> str | None:
    """`tensor 'x' of type Q5_0` when this reader cannot read it, else None."""
    if t.qtype not in DECODERS:
        kind = t.qtype.name if isinstance(t.qtype, QType) else f"code {t.qtype} (unknown to gguf-py)"
        return f"tensor {t.name!r} of type {kind}"
    if len(t.shape) > 2:
        return f"tensor {t.name!r} of {len(t.shape)} dimensions"
    return None


def _check_header(path: Path) -> None:
    """Magic and version, checked first so the error says which is wrong."""
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


# --- the header: little-endian, strings are a u64 length and UTF-8 bytes ---

GGML_MAX_DIMS = 4
_SCALARS = {VType.UINT8: "B", VType.INT8: "b", VType.UINT16: "H", VType.INT16: "h", VType.UINT32: "I",
            VType.INT32: "i", VType.FLOAT32: "f", VType.BOOL: "?", VType.UINT64: "Q", VType.INT64: "q",
            VType.FLOAT64: "d"}


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end")
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode()

    def value(self, vtype: VType) -> Any:
        if vtype == VType.STRING:
            return self.string()
        if vtype != VType.ARRAY:
            return self.scalar(_SCALARS[vtype])
        item, count = VType(self.scalar("I")), self.scalar("Q")
        if item in _SCALARS:  # numbers in one go: a 49k-entry token-type list is one read
            values = np.frombuffer(self.buf, "<" + _SCALARS[item], count, self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item) for _ in range(count)]


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor infos (absolute offsets); raises struct.error / ValueError on a
    truncated or corrupt header."""
    cur = _Cursor(buf)
    cur.pos = 8  # magic and version, checked already
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    if n_tensors > len(buf) or n_kv > len(buf):
        raise ValueError(f"it claims {n_tensors} tensors and {n_kv} metadata keys")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(VType(cur.scalar("I")))
    raw_infos = []
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.scalar("I")
        if n_dims > GGML_MAX_DIMS:
            raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
        dims = [cur.scalar("Q") for _ in range(n_dims)]
        raw_infos.append((name, cur.scalar("I"), tuple(reversed(dims)), cur.scalar("Q")))
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment={alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, code, shape, offset in raw_infos:
        try:
            qtype = QType(code)
        except ValueError:
            qtype = code
        block, size = GGML_QUANT_SIZES.get(qtype, (1, 0))  # an unknown type's size is unknown
        if shape and shape[-1] % block:
            raise ValueError(f"tensor {name!r} has rows of {shape[-1]} values, not whole blocks of {block}")
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * size
        infos.append(TensorInfo(name, qtype, shape, data_start + offset, n_bytes))
    if len({t.name for t in infos}) != len(infos):
        raise ValueError("a tensor name appears twice")
    return metadata, infos
