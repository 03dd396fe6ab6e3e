"""sentence-transformers BERT checkpoints as GGUF files that llama.cpp embeds with.

A checkpoint is the folder sentence-transformers saves (`config.json`, `model.safetensors`,
`tokenizer.json` or `vocab.txt`, `1_Pooling/config.json`), read from a directory or a zip
archive. It is converted once into the model cache (`$CLAWBOT_MODEL_CACHE`, default
`~/.cache/clawbot/models`), under a name holding the sha256 of its files and of this
converter's version: a changed checkpoint, or a fixed converter, gets a file of its own. The
file is written beside its final name and renamed into place under a file lock, so parallel
workers convert it once and a reader never sees half a file.

What llama.cpp's BERT wants (as its own `convert_hf_to_gguf.py` writes it):
- tokens in its WordPiece form: a word-initial piece gains U+2581, a `##` continuation loses
  the `##`, special tokens stay as they are (control tokens);
- `tokenizer.ggml.normalizer.lowercase` for an uncased vocabulary: without it llama.cpp
  neither lowercases nor strips accents, and most cased words become [UNK];
- `bert.pooling_type` from sentence-transformers' pooling module (mean, CLS or last token);
- matrices in f16; vectors (norms, biases) and the token-type embeddings in f32;
  `position_ids` and the unused pooler dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

CACHE_ENV: Final = "CLAWBOT_MODEL_CACHE"
CONVERTER_VERSION: Final = 1
"""Part of every cache key: raise it when the converter's output changes."""

REQUIRED_FILES: Final = ("config.json", "model.safetensors")
OPTIONAL_FILES: Final = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "1_Pooling/config.json",
)
_POOLING: Final = {
    "pooling_mode_mean_tokens": 1,  # LLAMA_POOLING_TYPE_MEAN
    "pooling_mode_cls_token": 2,  # LLAMA_POOLING_TYPE_CLS
    "pooling_mode_lasttoken": 3,  # LLAMA_POOLING_TYPE_LAST
}
_SAFETENSORS_DTYPES: Final = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}
_SKIPPED_TENSORS: Final = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_PHANTOM_SPACE: Final = "\u2581"
_CONTROL, _NORMAL = 3, 1  # gguf.TokenType


class ConversionError(ValueError):
    """The checkpoint is not a BERT model this converter can write as GGUF."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A sentence-transformers checkpoint's files by name (those the converter reads)."""

    name: str
    """What the GGUF calls the model (`general.name`) and its cache file."""
    files: Mapping[str, bytes]
    origin: str
    """Where the files were read from, for messages."""

    @classmethod
    def read(cls, path: Path, name: str | None = None) -> Checkpoint:
        """The checkpoint in a directory, or in a zip archive (its files at the root or under
        the folder holding `model.safetensors`)."""
        wanted = (*REQUIRED_FILES, *OPTIONAL_FILES)
        files: dict[str, bytes] = {}
        if path.is_dir():
            for item in wanted:
                if (path / item).is_file():
                    files[item] = (path / item).read_bytes()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                weights = [n for n in names if n.rsplit("/", 1)[-1] == "model.safetensors"]
                if not weights:
                    raise ConversionError(f"{path}: no model.safetensors in the archive")
                root = min(weights, key=len)[: -len("model.safetensors")]
                for item in wanted:
                    if root + item in names:
                        files[item] = archive.read(root + item)
        else:
            raise ConversionError(f"{path}: neither a checkpoint directory nor a zip archive")
        if "tokenizer.json" in files:  # the same vocabulary: one file keys the cache
            files.pop("vocab.txt", None)
        missing = [item for item in REQUIRED_FILES if item not in files]
        if missing:
            raise ConversionError(f"{path}: the checkpoint lacks {', '.join(missing)}")
        if "tokenizer.json" not in files and "vocab.txt" not in files:
            raise ConversionError(f"{path}: the checkpoint has no tokenizer.json nor vocab.txt")
        return cls(name=name or path.stem, files=files, origin=str(path))

    def digest(self) -> str:
        """sha256 of the converter version and every file, names and lengths included."""
        h = hashlib.sha256(f"clawbot-gguf-{CONVERTER_VERSION}\0".encode())
        for item in sorted(self.files):
            data = self.files[item]
            h.update(f"{item}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    def json(self, item: str) -> dict[str, Any]:
        """One of its JSON files, {} when absent."""
        data = self.files.get(item)
        if data is None:
            return {}
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ConversionError(f"{self.origin}: {item} is not a JSON object")
        return value


def model_cache_dir() -> Path:
    """Where converted models are kept: `$CLAWBOT_MODEL_CACHE`, else ~/.cache/clawbot/models."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "clawbot" / "models"


def cached_gguf(checkpoint: Checkpoint, cache_dir: Path | None = None) -> Path:
    """The checkpoint's GGUF in the cache, converted first if it is not there yet."""
    cache = cache_dir or model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{_safe_name(checkpoint.name)}-{checkpoint.digest()[:16]}.gguf"
    if target.is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if not target.is_file():  # another worker may have written it while we waited
            with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as scratch:
                partial = Path(scratch) / target.name
                convert(checkpoint, partial)
                os.replace(partial, target)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def convert(checkpoint: Checkpoint, out: Path) -> None:
    """Write the checkpoint as an f16 GGUF of llama.cpp's `bert` architecture to `out`."""
    import gguf

    config = checkpoint.json("config.json")
    if config.get("model_type") != "bert":
        raise ConversionError(
            f"{checkpoint.origin}: model_type {config.get('model_type')!r} is not 'bert'"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{checkpoint.origin}: only absolute position embeddings")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{checkpoint.origin}: only the gelu activation")
    n_layer = int(config["num_hidden_layers"])
    tensors = read_safetensors(checkpoint.files["model.safetensors"])
    vocab = _vocabulary(checkpoint)
    n_vocab = int(config.get("vocab_size", len(vocab.tokens)))
    if n_vocab != len(vocab.tokens):
        raise ConversionError(
            f"{checkpoint.origin}: {len(vocab.tokens)} tokens in the vocabulary, "
            f"{n_vocab} in config.json"
        )

    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(checkpoint.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(n_layer)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(_pooling(checkpoint)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", vocab.lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", vocab.strip_accents)
    writer.add_bos_token_id(vocab.special["cls"])
    writer.add_sep_token_id(vocab.special["sep"])
    writer.add_unk_token_id(vocab.special["unk"])
    if "pad" in vocab.special:
        writer.add_pad_token_id(vocab.special["pad"])
    if "mask" in vocab.special:
        writer.add_mask_token_id(vocab.special["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_eos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for hf_name, array in tensors.items():
        hf_name = hf_name.removeprefix("bert.")
        if hf_name in _SKIPPED_TENSORS or hf_name.startswith("cls."):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"{checkpoint.origin}: unexpected tensor {hf_name!r}")
        # llama.cpp adds the token-type row to f32 activations, which ggml's CPU add cannot
        # do from f16; convert_hf_to_gguf.py keeps it f32 too.
        half = array.ndim >= 2 and name != "token_types.weight"
        data = array.astype(np.float16 if half else np.float32)
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_safetensors(data: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Every tensor of a safetensors file, as arrays viewing `data` (little-endian)."""
    if len(data) < 8:
        raise ConversionError("model.safetensors is truncated")
    (length,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise ConversionError(f"model.safetensors has no readable header: {exc}") from exc
    base = 8 + length
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"tensor {name!r}: dtype {entry['dtype']} is not supported")
        start, end = entry["data_offsets"]
        if base + end > len(data):
            raise ConversionError(f"tensor {name!r} runs past the end of model.safetensors")
        kind = np.dtype(dtype).newbyteorder("<")
        array = np.frombuffer(data, kind, (end - start) // kind.itemsize, base + start)
        out[name] = array.reshape(entry["shape"])
    return out


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    tokens: list[str]
    types: list[int]
    special: dict[str, int]
    """Ids of `cls`, `sep`, `unk` and, where the vocabulary has them, `pad` and `mask`."""
    lowercase: bool
    strip_accents: bool


def _vocabulary(checkpoint: Checkpoint) -> _Vocabulary:
    """The WordPiece vocabulary in llama.cpp's form, its special tokens and normalization."""
    tokenizer = checkpoint.json("tokenizer.json")
    settings = checkpoint.json("tokenizer_config.json")
    special_names = {
        role: str(settings.get(f"{role}_token", f"[{role.upper()}]"))
        for role in ("cls", "sep", "unk", "pad", "mask")
    }
    special_texts = set(special_names.values())
    if tokenizer:
        model = tokenizer.get("model", {})
        if model.get("type") != "WordPiece":
            raise ConversionError(
                f"{checkpoint.origin}: tokenizer {model.get('type')!r} is not WordPiece"
            )
        by_id = {int(i): str(t) for t, i in model["vocab"].items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise ConversionError(f"{checkpoint.origin}: the vocabulary's ids have gaps")
        texts = [by_id[i] for i in range(len(by_id))]
        special_texts |= {
            str(t["content"]) for t in tokenizer.get("added_tokens", ()) if t.get("special")
        }
        normalizer = tokenizer.get("normalizer") or {}
        lowercase = bool(normalizer.get("lowercase", settings.get("do_lower_case", False)))
        accents = normalizer.get("strip_accents")
    else:
        texts = checkpoint.files["vocab.txt"].decode("utf-8").splitlines()
        lowercase = bool(settings.get("do_lower_case", True))
        accents = settings.get("strip_accents")
    index = {t: i for i, t in enumerate(texts)}
    special: dict[str, int] = {}
    for role, text in special_names.items():
        if text in index:
            special[role] = index[text]
        elif role in ("cls", "sep", "unk"):
            raise ConversionError(f"{checkpoint.origin}: the vocabulary has no {text}")
    tokens: list[str] = []
    types: list[int] = []
    for text in texts:
        if text in special_texts:
            tokens.append(text)
            types.append(_CONTROL)
        else:
            tokens.append(text[2:] if text.startswith("##") else _PHANTOM_SPACE + text)
            types.append(_NORMAL)
    return _Vocabulary(
        tokens=tokens,
        types=types,
        special=special,
        lowercase=lowercase,
        # BertNormalizer and BertTokenizer: unset strip_accents follows lowercase.
        strip_accents=lowercase if accents is None else bool(accents),
    )


def _pooling(checkpoint: Checkpoint) -> int:
    """llama.cpp's pooling type for sentence-transformers' pooling module (mean if none)."""
    config = checkpoint.json("1_Pooling/config.json")
    chosen = [key for key, value in config.items() if key.startswith("pooling_mode") and value]
    if not chosen:
        return _POOLING["pooling_mode_mean_tokens"]
    if len(chosen) > 1 or chosen[0] not in _POOLING:
        raise ConversionError(
            f"{checkpoint.origin}: pooling {', '.join(chosen)} is not one llama.cpp has "
            "(mean, CLS or last token)"
        )
    return _POOLING[chosen[0]]
