"""A BERT sentence encoder in numpy and BERT's tokenizer in Python: what llama.cpp must match.

`encode` is Hugging Face's BertModel forward pass (absolute positions, token type 0, exact
erf GELU, post-layer norms) followed by sentence-transformers' pooling and normalization;
`tokenize` is BertTokenizer (basic tokenizer, then greedy longest-match WordPiece).
`write_checkpoint` saves a small random BERT the way sentence-transformers saves one.
"""

from __future__ import annotations

import json
import math
import struct
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Weights = Mapping[str, npt.NDArray[np.float64]]

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_erf = np.vectorize(math.erf)


def read_weights(path: Path) -> dict[str, npt.NDArray[np.float64]]:
    """Every floating-point tensor of a safetensors file, as float64."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in ("F32", "F16"):
            continue
        start, end = entry["data_offsets"]
        kind = np.dtype(_DTYPES[entry["dtype"]])
        array = np.frombuffer(data, kind, (end - start) // kind.itemsize, 8 + length + start)
        out[name] = array.reshape(entry["shape"]).astype(np.float64)
    return out


def write_safetensors(path: Path, tensors: Mapping[str, npt.NDArray[Any]]) -> None:
    """A safetensors file of `tensors` (f32 or i64)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[array.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _layer_norm(
    x: npt.NDArray[np.float64], w: npt.NDArray[np.float64], b: npt.NDArray[np.float64], eps: float
) -> npt.NDArray[np.float64]:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: npt.NDArray[np.float64] = (x - mean) / np.sqrt(var + eps) * w + b
    return out


def encode(
    weights: Weights,
    ids: list[int],
    *,
    n_layer: int,
    n_head: int,
    eps: float = 1e-12,
    pooling: str = "mean",
) -> npt.NDArray[np.float64]:
    """The L2-normalized sentence vector of token ids `ids` (special tokens included)."""
    n = len(ids)
    e = "embeddings."
    x = (
        weights[e + "word_embeddings.weight"][ids]
        + weights[e + "position_embeddings.weight"][:n]
        + weights[e + "token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, weights[e + "LayerNorm.weight"], weights[e + "LayerNorm.bias"], eps)
    d = x.shape[1]
    hd = d // n_head
    for i in range(n_layer):
        p = f"encoder.layer.{i}."

        def linear(h: npt.NDArray[np.float64], name: str, p: str = p) -> npt.NDArray[np.float64]:
            out: npt.NDArray[np.float64] = h @ weights[p + name + ".weight"].T
            return out + weights[p + name + ".bias"]

        q, k, v = (
            linear(x, f"attention.self.{name}").reshape(n, n_head, hd).transpose(1, 0, 2)
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        x = _layer_norm(
            x + linear(context, "attention.output.dense"),
            weights[p + "attention.output.LayerNorm.weight"],
            weights[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = linear(x, "intermediate.dense")
        h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
        x = _layer_norm(
            x + linear(h, "output.dense"),
            weights[p + "output.LayerNorm.weight"],
            weights[p + "output.LayerNorm.bias"],
            eps,
        )
    pooled = {"mean": x.mean(0), "cls": x[0], "last": x[-1]}[pooling]
    out: npt.NDArray[np.float64] = pooled / np.linalg.norm(pooled)
    return out


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def tokenize(text: str, vocab: Mapping[str, int], *, lowercase: bool = True) -> list[int]:
    """BertTokenizer's ids for `text`: [CLS] word pieces [SEP]."""
    cleaned = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or (
            ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")
        ):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif _is_cjk(ord(ch)):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    words: list[str] = []
    for token in "".join(cleaned).split():
        if lowercase:
            token = unicodedata.normalize("NFD", token.lower())
            token = "".join(c for c in token if unicodedata.category(c) != "Mn")
        current = ""
        for ch in token:
            if _is_punctuation(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    ids = [vocab["[CLS]"]]
    for word in words:
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(piece)
                    break
                end -= 1
            else:
                pieces = ["[UNK]"]
                break
            start = end
        ids += [vocab[p] for p in pieces] if len(word) <= 100 else [vocab["[UNK]"]]
    return [*ids, vocab["[SEP]"]]


TINY_VOCAB = (
    "[PAD]",
    "[unused0]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "run",
    "##s",
    "##ning",
    "hello",
    "world",
    "un",
    "##aff",
    "##able",
    "cafe",
    ",",
    ".",
    "!",
    "我",
    "猫",
    "i",
    "like",
)


def write_checkpoint(
    folder: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    positions: int = 32,
    pooling: str = "pooling_mode_mean_tokens",
    model_type: str = "bert",
    vocab: tuple[str, ...] | list[str] = TINY_VOCAB,
) -> dict[str, Any]:
    """A random BERT saved as sentence-transformers saves one; returns its config."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["BertModel"],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "vocab_size": len(vocab),
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }

    def matrix(*shape: int, scale: float = 0.2) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix: str) -> dict[str, npt.NDArray[np.float32]]:
        return {
            prefix + ".weight": (1 + matrix(hidden, scale=0.1)).astype(np.float32),
            prefix + ".bias": matrix(hidden, scale=0.1),
        }

    tensors: dict[str, npt.NDArray[Any]] = {
        "embeddings.position_ids": np.arange(positions, dtype=np.int64)[None],
        "embeddings.word_embeddings.weight": matrix(len(vocab), hidden, scale=1.0),
        "embeddings.position_embeddings.weight": matrix(positions, hidden, scale=0.5),
        "embeddings.token_type_embeddings.weight": matrix(2, hidden, scale=0.5),
        **norm("embeddings.LayerNorm"),
        "pooler.dense.weight": matrix(hidden, hidden),
        "pooler.dense.bias": matrix(hidden),
    }
    for i in range(n_layer):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            tensors[p + f"attention.self.{name}.weight"] = matrix(hidden, hidden)
            tensors[p + f"attention.self.{name}.bias"] = matrix(hidden)
        tensors[p + "attention.output.dense.weight"] = matrix(hidden, hidden)
        tensors[p + "attention.output.dense.bias"] = matrix(hidden)
        tensors.update(norm(p + "attention.output.LayerNorm"))
        tensors[p + "intermediate.dense.weight"] = matrix(2 * hidden, hidden)
        tensors[p + "intermediate.dense.bias"] = matrix(2 * hidden)
        tensors[p + "output.dense.weight"] = matrix(hidden, 2 * hidden)
        tensors[p + "output.dense.bias"] = matrix(hidden)
        tensors.update(norm(p + "output.LayerNorm"))
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {"id": vocab.index(t), "content": t, "special": True} for t in special if t in vocab
        ],
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": True,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "model": {
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": {t: i for i, t in enumerate(vocab)},
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, pooling: True})
    )
    return config
