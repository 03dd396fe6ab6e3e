"""sentence-transformers checkpoints to GGUF: what is written, the cache, and llama.cpp on it.

The checkpoints are small random BERTs (`bert_reference.write_checkpoint`), so llama.cpp's
vectors are checked against the numpy forward pass on every run, in milliseconds.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.config import ConfigError, ModelConfig
from app.errors import ContextLengthExceeded, UnsupportedParameter
from app.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from backends.base import BackendSpec
from backends.llamacpp import convert as convert_module
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.convert import (
    CACHE_ENV,
    Checkpoint,
    ConversionError,
    cached_gguf,
    model_cache_dir,
)
from tests.backends.llamacpp.bert_reference import (
    TINY_VOCAB,
    encode,
    read_weights,
    tokenize,
    write_checkpoint,
)
from tests.conftest import AUTH, make_config

TEXTS = [
    "The cat sat on the mat.",
    "Hello, world!",
    "Unaffable dogs running",
    "Café CAFE cafe",
    "我 like 猫!",
    "a zebra",
    "",
]


@pytest.fixture(autouse=True)
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "tiny")
    return tmp_path / "tiny"


def make_backend(target: Path | str, **options: Any) -> LlamaCppBackend:
    model = ModelConfig(id="tiny", backend=f"llamacpp:{target}", options=options)
    return LlamaCppBackend(BackendSpec(model, "llamacpp", str(target), 30.0))


@pytest.fixture
async def backend(checkpoint_dir: Path) -> AsyncIterator[LlamaCppBackend]:
    b = make_backend(checkpoint_dir)
    await b.start()
    yield b
    await b.aclose()


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Scalar and array metadata, and each tensor's ggml type by name."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        value: Any = field.contents()
        fields[name] = value
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, types


def test_written_gguf_is_llama_cpp_bert(checkpoint_dir: Path, model_cache: Path) -> None:
    path = cached_gguf(Checkpoint.read(checkpoint_dir, "tiny"))
    assert path.parent == model_cache
    fields, types = read_gguf(path)
    assert fields["general.architecture"] == "bert"
    assert fields["general.name"] == "tiny"
    assert fields["bert.attention.causal"] is False
    assert fields["bert.pooling_type"] == 1  # mean
    assert fields["bert.context_length"] == 32
    assert fields["tokenizer.ggml.model"] == "bert"
    assert fields["tokenizer.ggml.normalizer.lowercase"] is True
    assert fields["tokenizer.ggml.normalizer.strip_accents"] is True
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[TINY_VOCAB.index("[CLS]")] == "[CLS]"
    assert tokens[TINY_VOCAB.index("cat")] == "\u2581cat"
    assert tokens[TINY_VOCAB.index("##ning")] == "ning"
    kinds = fields["tokenizer.ggml.token_type"]
    assert kinds[TINY_VOCAB.index("[SEP]")] == 3  # control
    assert kinds[TINY_VOCAB.index("[unused0]")] == 1  # not special: a normal token
    assert kinds[TINY_VOCAB.index("cat")] == 1
    assert fields["tokenizer.ggml.bos_token_id"] == TINY_VOCAB.index("[CLS]")
    assert fields["tokenizer.ggml.seperator_token_id"] == TINY_VOCAB.index("[SEP]")
    assert fields["tokenizer.ggml.unknown_token_id"] == TINY_VOCAB.index("[UNK]")
    assert fields["tokenizer.ggml.token_type_count"] == 2
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["token_embd.weight"] == "F16"
    assert types["token_types.weight"] == "F32"
    assert types["blk.1.layer_output_norm.bias"] == "F32"
    assert not [name for name in types if "pooler" in name or "position_ids" in name]


def test_cache_reuses_and_rekeys(checkpoint_dir: Path, model_cache: Path) -> None:
    first = cached_gguf(Checkpoint.read(checkpoint_dir, "tiny"))
    written = first.stat().st_mtime_ns
    assert cached_gguf(Checkpoint.read(checkpoint_dir, "tiny")) == first
    assert first.stat().st_mtime_ns == written
    settings = checkpoint_dir / "1_Pooling" / "config.json"
    settings.write_text(json.dumps({"pooling_mode_cls_token": True}))
    second = cached_gguf(Checkpoint.read(checkpoint_dir, "tiny"))
    assert second != first
    assert read_gguf(second)[0]["bert.pooling_type"] == 2  # CLS
    assert sorted(p.name for p in model_cache.iterdir() if not p.name.endswith(".lock")) == (
        sorted([first.name, second.name])
    )


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / ".cache" / "clawbot" / "models"


def test_parallel_callers_convert_once(
    checkpoint_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = convert_module.convert

    def counted(checkpoint: Checkpoint, out: Path) -> None:
        calls.append(out)
        real(checkpoint, out)

    monkeypatch.setattr(convert_module, "convert", counted)
    checkpoint = Checkpoint.read(checkpoint_dir, "tiny")
    results: list[Path] = []
    start = threading.Barrier(6)

    def worker() -> None:
        start.wait()
        results.append(cached_gguf(checkpoint))

    # flock locks open files, not processes: threads contend as separate workers would.
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1
    assert results[0].is_file()
    leftovers = [p.name for p in model_cache.iterdir() if p.name.startswith(".convert-")]
    assert leftovers == []


def test_zip_archive_is_the_same_checkpoint(checkpoint_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in checkpoint_dir.rglob("*"):
            if file.is_file():
                z.write(file, f"all-MiniLM/{file.relative_to(checkpoint_dir)}")
    from_zip = Checkpoint.read(archive, "tiny")
    from_dir = Checkpoint.read(checkpoint_dir, "tiny")
    assert from_zip.digest() == from_dir.digest()
    # vocab.txt says the same as tokenizer.json: it does not change the key.
    (checkpoint_dir / "vocab.txt").write_text("\n".join(TINY_VOCAB))
    assert Checkpoint.read(checkpoint_dir, "tiny").digest() == from_dir.digest()


def test_vocab_txt_alone_is_enough(checkpoint_dir: Path) -> None:
    (checkpoint_dir / "tokenizer.json").unlink()
    (checkpoint_dir / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    fields, _ = read_gguf(cached_gguf(Checkpoint.read(checkpoint_dir, "tiny")))
    assert fields["tokenizer.ggml.tokens"][TINY_VOCAB.index("##s")] == "s"
    assert fields["tokenizer.ggml.token_type"][TINY_VOCAB.index("[MASK]")] == 3
    assert fields["tokenizer.ggml.normalizer.lowercase"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "roberta"}, "is not 'bert'"),
        ({"pooling": "pooling_mode_max_tokens"}, "not one llama.cpp has"),
        ({"vocab": [*TINY_VOCAB[:3], *TINY_VOCAB[4:]]}, r"no \[CLS\]"),
    ],
)
def test_refuses_what_llama_cpp_cannot_run(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    write_checkpoint(tmp_path / "odd", **change)
    with pytest.raises(ConversionError, match=message):
        cached_gguf(Checkpoint.read(tmp_path / "odd"))


def test_refuses_an_incomplete_checkpoint(checkpoint_dir: Path) -> None:
    (checkpoint_dir / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"lacks model\.safetensors"):
        Checkpoint.read(checkpoint_dir)
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        make_backend(checkpoint_dir)


async def test_vectors_match_the_reference(backend: LlamaCppBackend, checkpoint_dir: Path) -> None:
    weights = read_weights(checkpoint_dir / "model.safetensors")
    vocab = {t: i for i, t in enumerate(TINY_VOCAB)}
    out = await backend.embed(EmbeddingRequest(model="tiny", input=TEXTS))
    assert backend._loaded is not None
    for text, item in zip(TEXTS, out.data, strict=True):
        ids = backend._loaded.tokenize(text, add_bos=True, special=False)
        assert ids == tokenize(text, vocab), text
        got = np.asarray(item.embedding)
        assert abs(np.linalg.norm(got) - 1) < 1e-6
        want = encode(weights, ids, n_layer=2, n_head=2)
        assert float(got @ want) > 0.999, text
    assert out.usage is not None
    assert out.usage.prompt_tokens == sum(len(tokenize(t, vocab)) for t in TEXTS)


async def test_pooling_comes_from_the_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "cls", pooling="pooling_mode_cls_token", seed=3)
    weights = read_weights(tmp_path / "cls" / "model.safetensors")
    b = make_backend(tmp_path / "cls")
    assert b.pooling == 2
    try:
        out = await b.embed(EmbeddingRequest(model="tiny", input="the cat sat"))
    finally:
        await b.aclose()
    ids = tokenize("the cat sat", {t: i for i, t in enumerate(TINY_VOCAB)})
    got = np.asarray(out.data[0].embedding)
    assert float(got @ encode(weights, ids, n_layer=2, n_head=2, pooling="cls")) > 0.999
    assert float(got @ encode(weights, ids, n_layer=2, n_head=2)) < 0.99


async def test_embedding_model_only_embeds(backend: LlamaCppBackend) -> None:
    caps = backend.capabilities
    assert (caps.chat, caps.completions, caps.embeddings) == (False, False, True)
    state = backend.state()
    assert state.context_length == 32
    assert state.engine is not None
    assert state.engine["slots"] == 0
    chat = ChatCompletionRequest(model="tiny", messages=[ChatMessage(role="user", content="hi")])
    with pytest.raises(UnsupportedParameter, match="embedding model"):
        await backend.chat(chat)
    with pytest.raises(UnsupportedParameter, match="embedding model"):
        await backend.complete(CompletionRequest(model="tiny", prompt="hi"))


async def test_inputs_longer_than_the_positions_are_refused(backend: LlamaCppBackend) -> None:
    fits = " ".join(["cat"] * 30)  # 30 words + [CLS] + [SEP]: the whole table of 32
    out = await backend.embed(EmbeddingRequest(model="tiny", input=fits))
    assert out.usage is not None
    assert out.usage.prompt_tokens == 32
    with pytest.raises(ContextLengthExceeded, match="input\\[1\\] is 33 tokens"):
        await backend.embed(EmbeddingRequest(model="tiny", input=["cat", fits + " cat"]))


def test_window_cannot_exceed_the_positions(checkpoint_dir: Path) -> None:
    assert make_backend(checkpoint_dir, n_ctx=16).embed_window == 16
    with pytest.raises(ConfigError, match="embeds at most 32 tokens"):
        make_backend(checkpoint_dir, n_ctx=64)


async def test_gateway_refuses_chat_and_serves_embeddings(
    checkpoint_dir: Path,
) -> None:
    from app.api.app import create_app
    from app.core.gateway import Gateway
    from tests.conftest import AppClient

    config = make_config([{"id": "tiny", "backend": f"llamacpp:{checkpoint_dir}"}])
    async with AppClient(create_app(Gateway.from_config(config))) as client:
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
            headers=AUTH,
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "unsupported_parameter"
        assert error["param"] == "model"
        r = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=AUTH
        )
        assert r.status_code == 400
        r = await client.post(
            "/v1/embeddings", json={"model": "tiny", "input": ["the cat", "a dog"]}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [64, 64]


def test_lock_files_do_not_leak_descriptors(checkpoint_dir: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        cached_gguf(Checkpoint.read(checkpoint_dir, "tiny"))
    assert len(os.listdir("/proc/self/fd")) == before
