"""GGUF header reading on the embedded model, on synthetic files and on broken ones."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from backends.llamacpp.backend import embedded_model_path
from backends.llamacpp.gguf import (
    COMPUTE_OVERHEAD_BYTES,
    GgufInfo,
    compute_buffer_bytes,
    estimate_footprint,
    kv_cache_bytes,
    read_metadata,
)
from backends.llamacpp.runtime import load_cpu_backend

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
FORMATS = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
    FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}  # fmt: skip
F32, F16, Q4_K = 0, 1, 12
MIB = 2**20


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(value_type: int, value: Any) -> bytes:
    if value_type == STRING:
        return gguf_string(value)
    return struct.pack(FORMATS[value_type], value)


def gguf_kv(key: str, value_type: int, value: Any) -> bytes:
    out = gguf_string(key) + struct.pack("<I", value_type)
    if value_type == ARRAY:
        elem_type, items = value
        out += struct.pack("<IQ", elem_type, len(items))
        out += b"".join(gguf_value(elem_type, item) for item in items)
    else:
        out += gguf_value(value_type, value)
    return out


def gguf_tensor(name: str, dims: list[int], tensor_type: int, offset: int = 0) -> bytes:
    return (
        gguf_string(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", tensor_type, offset)
    )


def gguf_bytes(
    kvs: list[tuple[str, int, Any]],
    tensors: Sequence[bytes] = (),
    version: int = 3,
) -> bytes:
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    return header + b"".join(gguf_kv(*kv) for kv in kvs) + b"".join(tensors)


LLAMA_KVS: list[tuple[str, int, Any]] = [
    ("general.architecture", STRING, "llama"),
    ("general.name", STRING, "Tiny"),
    ("general.file_type", UINT32, 15),
    ("llama.block_count", UINT32, 2),
    ("llama.context_length", UINT32, 4096),
    ("llama.embedding_length", UINT32, 256),
    ("llama.attention.head_count", UINT32, 8),
    ("llama.attention.head_count_kv", UINT32, 2),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "héllo", ""])),
]


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_embedded_model() -> None:
    path = embedded_model_path()
    info = read_metadata(path)
    assert (info.architecture, info.n_layer, info.n_embd) == ("llama", 30, 576)
    assert (info.n_head, info.n_head_kv, info.key_length, info.value_length) == (9, 3, 64, 64)
    assert info.context_length == 8192
    assert info.n_vocab == 49152
    assert info.quantization == "Q4_1"
    assert info.file_type == "Q4_1"
    assert 134_000_000 < info.n_params < 135_000_000
    assert info.file_size == path.stat().st_size
    assert info.metadata["general.architecture"] == "llama"
    assert isinstance(info.metadata["tokenizer.chat_template"], str)
    assert info.array_lengths["tokenizer.ggml.merges"] > 40_000
    assert "tokenizer.ggml.tokens" not in info.metadata


def test_embedded_model_footprint() -> None:
    info = read_metadata(embedded_model_path())
    kv = kv_cache_bytes(info, 2048)
    assert kv == 30 * 2048 * 3 * (64 + 64) * 2 == 45 * 2**20  # llama.cpp logs 45.00 MiB
    assert kv_cache_bytes(info, 2048, bytes_per_elem=1) == kv // 2
    compute = 512 * 4 * (49152 + 8 * 576) + COMPUTE_OVERHEAD_BYTES
    assert compute_buffer_bytes(info, 512) == compute
    assert estimate_footprint(info, 2048, 512) == info.file_size + kv + compute
    # without flash attention the scores over 2048 tokens still fit in the logits' memory ...
    assert estimate_footprint(info, 2048, 512, flash_attn=False) == info.file_size + kv + compute
    # ... but over 8192 they outgrow it
    scores = 512 * (8192 * (6 * 9 + 4) + 32 * 576) + COMPUTE_OVERHEAD_BYTES
    assert compute_buffer_bytes(info, 512, 8192, flash_attn=False) == scores


@pytest.mark.slow
@pytest.mark.parametrize(("n_ctx", "flash_attn"), [(2048, True), (2048, False), (8192, False)])
def test_estimate_bounds_what_llama_cpp_reserves(
    capfd: pytest.CaptureFixture[str], n_ctx: int, flash_attn: bool
) -> None:
    import llama_cpp

    load_cpu_backend()  # a portable build's CPU backend, as clawbot loads it
    path = embedded_model_path()
    info = read_metadata(path)
    capfd.readouterr()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, flash_attn=flash_attn, verbose=True
    )
    llm.close()
    log = capfd.readouterr().err
    kv = re.search(r"KV buffer size = +([\d.]+) MiB", log)
    compute = re.search(r"compute buffer size = +([\d.]+) MiB", log)
    assert kv is not None, log
    assert compute is not None, log
    assert float(kv[1]) == pytest.approx(kv_cache_bytes(info, n_ctx) / MIB, abs=0.01)
    estimate = compute_buffer_bytes(info, 512, n_ctx, flash_attn=flash_attn) / MIB
    # above the reservation: the CPU backend's work buffer (scores in f16) comes on top of it
    assert float(compute[1]) < estimate < float(compute[1]) * 1.7


def test_synthetic_v3(tmp_path: Path) -> None:
    kvs = [
        *LLAMA_KVS,
        ("x.u8", UINT8, 200),
        ("x.i8", INT8, -5),
        ("x.u16", UINT16, 60000),
        ("x.i16", INT16, -300),
        ("x.i32", INT32, -70000),
        ("x.i64", INT64, -(2**40)),
        ("x.u64", UINT64, 2**63),
        ("x.f32", FLOAT32, 0.5),
        ("x.f64", FLOAT64, 1e100),
        ("x.flag", BOOL, True),
        ("x.ints", ARRAY, (INT32, [1, 2, 3])),
        ("x.floats", ARRAY, (FLOAT64, [1.5] * 7)),
        ("x.empty", ARRAY, (STRING, [])),
    ]
    path = write(tmp_path, gguf_bytes(kvs, [gguf_tensor("blk.0.w", [256, 64], Q4_K)]))
    info = read_metadata(path)
    assert info == GgufInfo(
        architecture="llama",
        name="Tiny",
        n_layer=2,
        n_embd=256,
        n_head=8,
        n_head_kv=2,
        key_length=32,
        value_length=32,
        context_length=4096,
        n_vocab=4,
        n_params=256 * 64,
        quantization="Q4_K",
        file_type="Q4_K_M",
        file_size=path.stat().st_size,
        metadata=info.metadata,
        array_lengths=info.array_lengths,
    )
    assert info.metadata["x.u8"] == 200
    assert info.metadata["x.i8"] == -5
    assert info.metadata["x.u16"] == 60000
    assert info.metadata["x.i16"] == -300
    assert info.metadata["x.i32"] == -70000
    assert info.metadata["x.i64"] == -(2**40)
    assert info.metadata["x.u64"] == 2**63
    assert info.metadata["x.f32"] == 0.5
    assert info.metadata["x.f64"] == 1e100
    assert info.metadata["x.flag"] is True
    assert dict(info.array_lengths) == {
        "tokenizer.ggml.tokens": 4,
        "x.ints": 3,
        "x.floats": 7,
        "x.empty": 0,
    }


def test_version_2(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes(LLAMA_KVS, [gguf_tensor("w", [8], F32)], version=2))
    assert read_metadata(path).n_params == 8


def test_defaults_and_per_layer_heads(tmp_path: Path) -> None:
    kvs = [
        ("general.architecture", STRING, "openelm"),
        ("openelm.block_count", UINT32, 3),
        ("openelm.context_length", UINT32, 2048),
        ("openelm.embedding_length", UINT32, 1280),
        ("openelm.attention.head_count", ARRAY, (INT32, [12, 16, 20])),
        ("openelm.attention.key_length", UINT32, 64),
    ]
    info = read_metadata(write(tmp_path, gguf_bytes(kvs)))
    assert (info.n_head, info.n_head_kv) == (20, 20)  # kv heads default to heads
    assert (info.key_length, info.value_length) == (64, 1280 // 20)
    assert info.array_lengths["openelm.attention.head_count"] == 3
    assert (info.name, info.file_type, info.n_vocab) == (None, None, 0)
    assert (info.n_params, info.quantization) == (0, "none")

    kvs[4] = ("openelm.attention.head_count", UINT32, 16)
    kvs.append(("openelm.attention.head_count_kv", ARRAY, (UINT32, [0, 4, 2])))
    info = read_metadata(write(tmp_path, gguf_bytes(kvs)))
    assert (info.n_head, info.n_head_kv, info.value_length) == (16, 4, 80)


def test_dominant_quantization_by_parameters(tmp_path: Path) -> None:
    tensors = [
        gguf_tensor("token_embd.weight", [256, 1000], 14),  # Q6_K, 256k parameters
        gguf_tensor("blk.0.attn_q.weight", [256, 256], Q4_K),
        gguf_tensor("blk.0.ffn_up.weight", [256, 768], Q4_K),  # 256k + 64k of Q4_K
        gguf_tensor("blk.0.attn_norm.weight", [256], F32),
        gguf_tensor("odd", [4, 4, 4, 4], 99),
    ]
    info = read_metadata(write(tmp_path, gguf_bytes(LLAMA_KVS, tensors)))
    assert info.quantization == "Q4_K"
    assert info.n_params == 256_000 + 65_536 + 196_608 + 256 + 256


def one_kv(raw_value: bytes) -> bytes:
    """A file holding one key, "k", followed by `raw_value` (its type and value)."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k") + raw_value


def valid_file() -> bytes:
    return gguf_bytes(LLAMA_KVS, [gguf_tensor("w", [16, 16], F16)])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a GGUF file"),
        (b"GGU", "not a GGUF file"),
        (b"GGML" + valid_file()[4:], "not a GGUF file"),
        (b"GGUF" + struct.pack("<I", 1) + valid_file()[8:], "unsupported GGUF version 1"),
        (b"GGUF" + struct.pack("<I", 4) + valid_file()[8:], "unsupported GGUF version 4"),
        (b"GGUF" + struct.pack("<I", 3 << 24) + valid_file()[8:], "unsupported GGUF version"),
        (valid_file()[:10], "truncated"),
        (one_kv(struct.pack("<IQ", STRING, 500) + b"x" * 100), "value of 'k' length 500 runs"),
        # cut in the middle of a tokenizer string, "héllo"
        (valid_file()[: valid_file().index("héllo".encode()) + 2], "array string length 6 runs"),
        (valid_file()[:-3], "truncated"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62), "cannot fit"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "cannot fit"),
        (gguf_bytes([]), "general.architecture"),
        (gguf_bytes([("general.architecture", UINT32, 1)]), "general.architecture"),
        (gguf_bytes(LLAMA_KVS[:3]), "'llama.block_count' is missing"),
        (gguf_bytes([*LLAMA_KVS, ("llama.block_count", UINT32, 2)]), "duplicate key"),
        (gguf_bytes([("", UINT8, 1)]), "empty key"),
        (one_kv(struct.pack("<IB", 13, 1)), "invalid value type 13"),
        (gguf_bytes([("k", ARRAY, (ARRAY, []))]), "invalid element type 9"),
        (gguf_bytes(LLAMA_KVS, [gguf_tensor("w", [1] * 5, F32)]), "5 dimensions"),
    ],
)
def test_malformed(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_metadata(write(tmp_path, data))


def absurd_string(length: int) -> bytes:
    """A file whose first key claims `length` bytes."""
    return b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, length) + b"general.architecture"


@pytest.mark.parametrize("length", [2**63, 2**40, 1000])
def test_absurd_string_length(tmp_path: Path, length: int) -> None:
    with pytest.raises(ValueError, match=r"key length \d+ runs past the end"):
        read_metadata(write(tmp_path, absurd_string(length)))


def test_absurd_array_lengths(tmp_path: Path) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k")
    strings = header + struct.pack("<IIQ", ARRAY, STRING, 2**61)
    with pytest.raises(ValueError, match="array 'k' of 2305843009213693952 strings cannot fit"):
        read_metadata(write(tmp_path, strings))

    ints = header + struct.pack("<IIQ", ARRAY, UINT64, 2**60)
    with pytest.raises(ValueError, match=r"array 'k' of \d+ \* 8 bytes runs past the end"):
        read_metadata(write(tmp_path, ints))

    # a string inside the array claims more than the file holds
    bad = header + struct.pack("<IIQ", ARRAY, STRING, 2) + gguf_string("a")
    bad += struct.pack("<Q", 2**40) + b"b"
    with pytest.raises(ValueError, match="array string length 1099511627776 runs past"):
        read_metadata(write(tmp_path, bad))


def test_large_string_array_crosses_read_windows(tmp_path: Path) -> None:
    tokens = [f"token-{i}-" + "x" * (i % 300) for i in range(20_000)]  # about 3.5 MiB
    kvs = [*LLAMA_KVS[:-1], ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens))]
    kvs.append(("tokenizer.chat_template", STRING, "y" * (3 << 20)))  # spans whole windows
    kvs.append(("big.strings", ARRAY, (STRING, ["z" * (2 << 20), "w"])))  # skipped by seeking
    kvs.append(("after", STRING, "end"))
    info = read_metadata(write(tmp_path, gguf_bytes(kvs, [gguf_tensor("w", [3], F32)])))
    assert info.n_vocab == 20_000
    assert info.metadata["after"] == "end"
    assert len(str(info.metadata["tokenizer.chat_template"])) == 3 << 20
    assert info.n_params == 3
