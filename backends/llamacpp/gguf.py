"""GGUF header reading and the RAM a loaded model needs, without loading it.

The gateway sizes models against a memory budget before llama.cpp maps them, so this reads only
the header (metadata and tensor infos, the first few MiB) in pure Python: GGUF v2 and v3,
little-endian. Tokenizer arrays are skipped, not decoded, which keeps a 49k-token vocabulary
well under 100 ms. Anything that is not a well-formed GGUF raises `ValueError`.

The footprint estimate is file size (weights: mmapped, and all touched by inference) + the
f16 KV cache + a compute-buffer term. Measured on the embedded SmolLM2-135M Q4_1 (94 MiB file;
llama-cpp-python 0.3.36, CPU, n_batch 512, one sequence): RSS growth from before loading to
after evaluating a whole context of tokens, with and without flash attention (FA), against
`estimate_footprint`; llama.cpp's own log put the KV cache at exactly `kv_cache_bytes`:
- n_ctx 2048: RSS +174 MiB (FA) / +222 MiB (no FA), estimated 276 MiB; KV 45 MiB, compute
  buffer reserved 102.5 MiB (FA) / 99.4 MiB (no FA), estimated 137 MiB.
- n_ctx 8192: RSS +316 MiB (FA) / +532 MiB (no FA), estimated 411 / 547 MiB; KV 180 MiB,
  compute buffer reserved 98.3 / 166.4 MiB, estimated 137 / 273 MiB.
- The FA runs stay well under the estimate because generating touches one row of the batch's
  logits, which llama.cpp reserves (96 MiB, as much as this model's weights) for embeddings
  and prompt log probabilities.
- Reading this header takes 17 ms.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, NoReturn

Scalar = int | float | bool | str

GGML_TYPE_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
        10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
        16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
        22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
        29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4",
        41: "Q1_0", 42: "Q2_0",
    }
)  # fmt: skip
"""ggml tensor type ids (ggml.h `enum ggml_type`)."""

FILE_TYPE_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
        11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
        17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
        23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
        29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
        38: "MXFP4_MOE", 39: "NVFP4",
    }
)  # fmt: skip
"""`general.file_type` ids (llama.h `enum llama_ftype`): the quantization recipe's name."""

COMPUTE_OVERHEAD_BYTES: Final = 32 << 20
"""Fixed part of the compute-buffer estimate: graph metadata, scheduler, small buffers."""

_MAGIC: Final = b"GGUF"
_VERSIONS: Final = (2, 3)
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS
_CHUNK: Final = 1 << 20
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_TYPE_STRING: Final = 8
_TYPE_ARRAY: Final = 9
_SCALAR_FORMATS: Final[Mapping[int, struct.Struct]] = MappingProxyType(
    {
        0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"),
        3: struct.Struct("<h"), 4: struct.Struct("<I"), 5: struct.Struct("<i"),
        6: struct.Struct("<f"), 7: struct.Struct("<B"), 10: struct.Struct("<Q"),
        11: struct.Struct("<q"), 12: struct.Struct("<d"),
    }
)  # fmt: skip
_TYPE_BOOL: Final = 7
_INT_TYPES: Final = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_READ_ARRAY_SUFFIXES: Final = (".attention.head_count", ".attention.head_count_kv")
"""Per-layer arrays worth reading (some models vary heads by layer); all others are skipped."""


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """What a GGUF header says about a model's shape, size and quantization."""

    architecture: str
    """`general.architecture`, the prefix of the model's own keys (`llama`, `qwen2`, …)."""
    name: str | None
    """`general.name`."""
    n_layer: int
    n_embd: int
    n_head: int
    """Attention heads (the largest, where it varies by layer); 0 for attention-free models."""
    n_head_kv: int
    """KV heads (the largest, where it varies by layer); defaults to `n_head`."""
    key_length: int
    value_length: int
    context_length: int
    """The training context (`{arch}.context_length`)."""
    n_vocab: int
    """`tokenizer.ggml.tokens` length; 0 when the file has no vocabulary."""
    n_params: int
    quantization: str
    """The ggml type holding the most parameters (`Q4_K`, `Q8_0`, `F16`, …)."""
    file_type: str | None
    """`general.file_type` by name (`Q4_K_M`: the recipe, which `quantization` cannot tell)."""
    file_size: int
    metadata: Mapping[str, Scalar] = field(repr=False, hash=False)
    """Every scalar key-value pair."""
    array_lengths: Mapping[str, int] = field(repr=False, hash=False)
    """The length of every array-valued key (contents are skipped)."""


class _Reader:
    """Little-endian reads through a 1 MiB window, with every length bounded by the file size.

    One `read()` per MiB rather than per field keeps a header of 100k short strings cheap, and
    checking lengths against what is left of the file makes a bogus length fail at once.
    """

    def __init__(self, file: BinaryIO, size: int, path: Path) -> None:
        self._file = file
        self._size = size
        self.path = path
        self._buf = b""
        self._pos = 0
        self._base = 0
        """File offset of `_buf[0]`."""

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def remaining(self) -> int:
        return self._size - self.offset

    def fail(self, message: str) -> NoReturn:
        raise ValueError(f"{self.path}: {message} (at byte {self.offset})")

    def _fill(self, n: int) -> None:
        """Make `n` bytes available at `_pos`, or fail as truncated."""
        if n > self.remaining:
            self.fail(f"truncated GGUF: needs {n} more bytes, the file has {self.remaining}")
        self._base += self._pos
        self._buf = self._buf[self._pos :] + self._file.read(max(_CHUNK, n))
        self._pos = 0
        if len(self._buf) < n:
            self.fail("the file shrank while being read")

    def take(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            self._fill(n)
        start = self._pos
        self._pos += n
        return self._buf[start : self._pos]

    def unpack(self, fmt: struct.Struct) -> int | float:
        if len(self._buf) - self._pos < fmt.size:
            self._fill(fmt.size)
        (value,) = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.unpack(_U32))

    def u64(self) -> int:
        return int(self.unpack(_U64))

    def skip(self, n: int) -> None:
        if n <= len(self._buf) - self._pos:
            self._pos += n
            return
        if n > self.remaining:
            self.fail(f"truncated GGUF: needs {n} more bytes, the file has {self.remaining}")
        self._base = self.offset + n
        self._file.seek(self._base)
        self._buf = b""
        self._pos = 0

    def string_length(self, what: str) -> int:
        n = self.u64()
        if n > self.remaining:
            self.fail(f"{what} length {n} runs past the end of the file")
        return n

    def string(self, what: str) -> str:
        return self.take(self.string_length(what)).decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings: the tokenizer's tens of thousands, so kept to a tight loop."""
        unpack = _U64.unpack_from
        buf, pos, end = self._buf, self._pos, len(self._buf)
        for _ in range(count):
            if end - pos < 8:
                self._pos = pos
                self._fill(8)
                buf, pos, end = self._buf, self._pos, len(self._buf)
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                self._pos = pos
                if n > self.remaining:
                    self.fail(f"array string length {n} runs past the end of the file")
                self.skip(n)
                buf, pos, end = self._buf, self._pos, len(self._buf)
            else:
                pos += n
        self._pos = pos


def read_metadata(path: Path) -> GgufInfo:
    """Read a GGUF file's header: the model's shape, parameter count and quantization."""
    with path.open("rb") as file:
        size = path.stat().st_size
        reader = _Reader(file, size, path)
        return _parse(reader, size)


def _parse(r: _Reader, size: int) -> GgufInfo:
    magic = r.take(4) if size >= 4 else b""
    if magic != _MAGIC:
        raise ValueError(f"{r.path}: not a GGUF file (magic {magic!r}, expected {_MAGIC!r})")
    version = r.u32()
    if version not in _VERSIONS:
        r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64()
    n_kv = r.u64()
    if n_kv * 13 > r.remaining:  # key length, 1-byte key, value type, 1-byte value at least
        r.fail(f"{n_kv} key-value pairs cannot fit in the file")
    if n_tensors * 24 > r.remaining:  # name length, n_dims, type, offset at least
        r.fail(f"{n_tensors} tensors cannot fit in the file")

    metadata: dict[str, Scalar] = {}
    arrays: dict[str, int] = {}
    int_arrays: dict[str, list[int]] = {}
    for _ in range(n_kv):
        key = r.string("key")
        if not key:
            r.fail("empty key")
        if key in metadata or key in arrays:
            r.fail(f"duplicate key {key!r}")
        value_type = r.u32()
        if value_type == _TYPE_ARRAY:
            values = _read_array(r, key)
            arrays[key] = len(values) if isinstance(values, list) else values
            if isinstance(values, list):
                int_arrays[key] = values
        else:
            metadata[key] = _read_scalar(r, key, value_type)

    by_type: dict[int, int] = {}
    for _ in range(n_tensors):
        name = r.string("tensor name")
        n_dims = r.u32()
        if n_dims > _MAX_DIMS:
            r.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        count = 1
        for _ in range(n_dims):
            count *= r.u64()
        tensor_type = r.u32()
        r.u64()  # offset into the data section
        by_type[tensor_type] = by_type.get(tensor_type, 0) + count

    return _info(r, metadata, arrays, int_arrays, by_type, size)


def _read_scalar(r: _Reader, key: str, value_type: int) -> Scalar:
    if value_type == _TYPE_STRING:
        return r.string(f"value of {key!r}")
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is None:
        r.fail(f"key {key!r} has invalid value type {value_type}")
    value = r.unpack(fmt)
    return bool(value) if value_type == _TYPE_BOOL else value


def _read_array(r: _Reader, key: str) -> int | list[int]:
    """Skip an array, returning its length; per-layer head counts are read and returned."""
    elem_type = r.u32()
    count = r.u64()
    if elem_type == _TYPE_STRING:
        if count * 8 > r.remaining:
            r.fail(f"array {key!r} of {count} strings cannot fit in the file")
        r.skip_strings(count)
        return count
    fmt = _SCALAR_FORMATS.get(elem_type)
    if fmt is None:  # llama.cpp rejects nested arrays too
        r.fail(f"array {key!r} has invalid element type {elem_type}")
    if count * fmt.size > r.remaining:
        r.fail(f"array {key!r} of {count} * {fmt.size} bytes runs past the end of the file")
    if key.endswith(_READ_ARRAY_SUFFIXES) and elem_type in _INT_TYPES:
        return [int(v) for (v,) in fmt.iter_unpack(r.take(count * fmt.size))]
    r.skip(count * fmt.size)
    return count


def _info(
    r: _Reader,
    metadata: dict[str, Scalar],
    arrays: dict[str, int],
    int_arrays: dict[str, list[int]],
    by_type: dict[int, int],
    size: int,
) -> GgufInfo:
    def text(key: str) -> str | None:
        value = metadata.get(key)
        return value if isinstance(value, str) else None

    def integer(key: str, default: int | None = None) -> int:
        value = metadata.get(key)
        if key in int_arrays:  # per-layer values: the largest sizes the cache
            return max(int_arrays[key], default=0)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if value is None and default is not None:
            return default
        what = "missing" if value is None else f"not an integer ({value!r})"
        raise ValueError(f"{r.path}: GGUF key {key!r} is {what}")

    arch = text("general.architecture")
    if arch is None:
        raise ValueError(f"{r.path}: GGUF has no string 'general.architecture'")
    n_layer = integer(f"{arch}.block_count")
    n_embd = integer(f"{arch}.embedding_length")
    n_head = integer(f"{arch}.attention.head_count", 0)
    head_dim = n_embd // n_head if n_head else 0
    file_type = metadata.get("general.file_type")
    n_vocab = arrays.get("tokenizer.ggml.tokens") or integer(f"{arch}.vocab_size", 0)
    dominant = max(by_type, key=by_type.__getitem__) if by_type else None
    return GgufInfo(
        architecture=arch,
        name=text("general.name"),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=integer(f"{arch}.attention.head_count_kv", n_head),
        key_length=integer(f"{arch}.attention.key_length", head_dim),
        value_length=integer(f"{arch}.attention.value_length", head_dim),
        context_length=integer(f"{arch}.context_length"),
        n_vocab=n_vocab,
        n_params=sum(by_type.values()),
        quantization="none" if dominant is None else _type_name(GGML_TYPE_NAMES, dominant),
        file_type=_type_name(FILE_TYPE_NAMES, file_type) if isinstance(file_type, int) else None,
        file_size=size,
        metadata=MappingProxyType(metadata),
        array_lengths=MappingProxyType(arrays),
    )


def _type_name(names: Mapping[int, str], type_id: int) -> str:
    return names.get(type_id, f"type {type_id}")


def kv_cache_bytes(info: GgufInfo, n_ctx_total: int, bytes_per_elem: int = 2) -> int:
    """Bytes of K and V cache for `n_ctx_total` tokens (all sequences together), f16 by default.

    Every layer's full-size cache is counted: sliding-window layers (Gemma) and quantized
    caches take less, so this errs high.
    """
    per_token = info.n_head_kv * (info.key_length + info.value_length) * bytes_per_elem
    return info.n_layer * n_ctx_total * per_token


def compute_buffer_bytes(
    info: GgufInfo, n_batch: int, n_ctx_total: int = 0, *, flash_attn: bool = True
) -> int:
    """llama.cpp's CPU compute buffer for one batch, roughly, in bytes.

    `n_batch * (max(logits, scores) + 32 * n_embd) + 32 MiB`, per token of the batch: f32
    logits (`4 * n_vocab`), eight embedding-wide f32 activations, and without flash attention
    the attention scores over the whole context (`n_ctx_total * (6 * n_head + 4)`: f32 scores,
    the f16 copy the CPU backend makes of them, the f32 mask). llama.cpp reuses the scores'
    memory for the logits, hence the max. With flash attention (llama.cpp's default, `auto`,
    turns it on for CPUs) no scores are kept.
    """
    logits = 4 * info.n_vocab
    scores = 0 if flash_attn else n_ctx_total * (6 * info.n_head + 4)
    return n_batch * (max(logits, scores) + 32 * info.n_embd) + COMPUTE_OVERHEAD_BYTES


def estimate_footprint(
    info: GgufInfo, n_ctx_total: int, n_batch: int, *, flash_attn: bool = True
) -> int:
    """Bytes of RAM the model needs once loaded: weights + KV cache + compute buffer.

    The weights count in full: they are mmapped, and every token's inference touches them all.
    The logits of a whole batch are counted although generating touches one row per sequence:
    embeddings and prompt log probabilities fill them all.
    """
    kv = kv_cache_bytes(info, n_ctx_total)
    compute = compute_buffer_bytes(info, n_batch, n_ctx_total, flash_attn=flash_attn)
    return info.file_size + kv + compute
