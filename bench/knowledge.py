"""The knowledge base: search latency at scale, ingestion speed, and retrieval quality.

Three parts, each a table (`--parts`):

  latency   A store of N chunks (`--sizes`, default 10k and 100k) per database (a SQLite file,
            and the real PostgreSQL at 127.0.0.1:5432 when it answers): synthetic text from a
            Zipf vocabulary with Chinese mixed in, random unit vectors of the embedding size.
            p50/p99 of full-text only, vector only and the whole hybrid search (both, fused,
            hits loaded), over 200 queries; the first (cold) search, which reads the store's
            index, separately, and the index's size. Goal: hybrid p50 <= 20 ms at 100k on
            SQLite.
  ingest    Uploads the labelled documents (bench/data/knowledge_qa.json) many times over
            through the in-process gateway with the embedding model (`--model`) and times
            chunks/s until every file is indexed; the baseline is the same model embedding the
            same chunks directly (/v1/embeddings' path), so the table shows what extraction,
            chunking and indexing add.
  quality   The labelled set in one store: each question is searched by full text only, by
            vector only, and fused (reciprocal rank fusion, and a min-max linear blend to
            compare), and the fused top 20 reranked by the embedding model's similarity (the
            rerank stage with `knowledge.rerank_model` set to it); recall@5 and MRR of the
            document holding the answer, per language and question kind (keyword /
            paraphrase / identifier). Goal: hybrid recall@5 above both single methods.

    .venv/bin/python bench/knowledge.py                       # everything
    .venv/bin/python bench/knowledge.py --parts quality --model "llamacpp:all-minilm-l6-v2"
    .venv/bin/python bench/knowledge.py --parts latency --sizes 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.config import KnowledgeSettings, parse_config
from app.core.gateway import Gateway
from app.knowledge.chunking import TextChunk
from app.knowledge.files import Upload
from app.knowledge.index import (
    StoreCache,
    linear_fusion,
    reciprocal_rank_fusion,
    text_ranking,
    vector_ranking,
    write_chunks,
)
from app.knowledge.records import Principal
from app.knowledge.schema import Chunk
from app.knowledge.search import Query, Searcher
from app.knowledge.stores import NewStore, Stores
from app.ledger.storage.database import Database

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
Ranking = list[tuple[int, float]]
Rankings = tuple[Ranking, Ranking, Ranking]
"""Full text, vector, and the fused candidates reranked."""
DATA = Path(__file__).resolve().parent / "data" / "knowledge_qa.json"
ADMIN = Principal(owner="", sees_all=True)
CJK_WORDS = [
    "客服",
    "退款",
    "发货",
    "订单",
    "物流",
    "保修",
    "发票",
    "积分",
    "账户",
    "密码",
    "支付",
    "尺码",
    "隐私",
    "关税",
    "快递",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`."""
    return float(np.percentile(np.asarray(values), q))


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


# -- latency ---------------------------------------------------------------------------------


def _vocabulary(size: int = 5000) -> tuple[list[str], np.ndarray]:
    rng = random.Random(7)
    words = {
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(size * 2)
    }
    vocab = sorted(words)[:size]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    return vocab, weights / weights.sum()


async def _fill(db: Database, store_id: str, n: int, dims: int) -> float:
    vocab, weights = _vocabulary()
    rng = np.random.default_rng(11)
    started = time.perf_counter()
    per_file = 1000
    for f in range(0, n, per_file):
        count = min(per_file, n - f)
        chunks = []
        for _ in range(count):
            words = list(rng.choice(vocab, size=120, p=weights))
            if rng.random() < 0.3:
                words += list(rng.choice(CJK_WORDS, size=8))
            chunks.append(TextChunk(" ".join(words), 160, None))
        vectors = rng.standard_normal((count, dims)).astype(np.float32)
        async with db.session() as session, session.begin():
            await write_chunks(session, store_id, f"file-{f:08d}", chunks, vectors.tolist())
    return time.perf_counter() - started


async def latency(url: str, label: str, n: int, dims: int, queries: int) -> list[Any]:
    db = Database(url)
    await db.upgrade()
    settings = KnowledgeSettings()
    stores = Stores(db, settings, lambda: "bench", lambda: None)
    store = await stores.create(ADMIN, NewStore(name=f"bench-{n}"))
    store_id = store.store.id
    fill_s = await _fill(db, store_id, n, dims)
    cache = StoreCache(db)
    rng = np.random.default_rng(5)
    vocab, _ = _vocabulary()

    async def embed(model: str, text: str) -> list[float]:
        return list(rng.standard_normal(dims).astype(np.float32))

    searcher = Searcher(db, stores, cache, embed)
    # Query words are content words (vocabulary ranks 100 and up): the most frequent words of
    # a Zipf text play the part of stop words, which queries leave out.
    texts = [" ".join(rng.choice(vocab[100:], size=4)) for _ in range(queries)]
    started = time.perf_counter()
    await searcher.search(ADMIN, [store_id], Query(text=texts[0]))
    cold_ms = (time.perf_counter() - started) * 1000
    full, by_text, by_vector = [], [], []
    for text in texts:
        t0 = time.perf_counter()
        await searcher.search(ADMIN, [store_id], Query(text=text, max_num_results=10))
        full.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        text_ranking(await cache.index(store_id), text, 40, None)
        by_text.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        vector_ranking(await cache.index(store_id), await embed("", text), 40, None)
        by_vector.append((time.perf_counter() - t0) * 1000)
    index = await cache.index(store_id)
    vectors_mb = index.vectors.nbytes / 1e6
    postings_mb = sum(s.nbytes for s in index.segments) / 1e6
    await stores.delete(ADMIN, store_id)
    await db.aclose()
    return [
        label,
        f"{n:,}",
        f"{n / fill_s:,.0f}",
        f"{cold_ms:.0f}",
        f"{vectors_mb:.0f} + {postings_mb:.0f}",
        f"{percentile(by_text, 50):.1f} / {percentile(by_text, 99):.1f}",
        f"{percentile(by_vector, 50):.1f} / {percentile(by_vector, 99):.1f}",
        f"{percentile(full, 50):.1f} / {percentile(full, 99):.1f}",
    ]


# -- the gateway with a real embedding model --------------------------------------------------


def _gateway(model: str, url: str) -> Gateway:
    config = parse_config(
        {
            "database": {"url": url},
            "models": [{"id": "embedder", "backend": model}],
            "knowledge": {"embedding_model": "embedder", "workers": 2, "blobs": "database:"},
            "logging": {"level": "WARNING"},
        }
    )
    return Gateway.from_config(config)


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = json.loads(DATA.read_text())["docs"]
    return docs


async def _wait_indexed(gateway: Gateway, store_id: str, total: int) -> None:
    assert gateway.knowledge is not None
    while True:
        view = await gateway.knowledge.stores.view(ADMIN, store_id)
        if view.counts.in_progress == 0 and view.counts.total >= total:
            return
        await asyncio.sleep(0.05)


async def ingest(model: str, copies: int) -> list[list[Any]]:
    folder = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    gateway = _gateway(model, f"sqlite+aiosqlite:///{folder / 'kb.db'}")
    await gateway.start()
    kb = gateway.knowledge
    assert kb is not None
    assert gateway.model_calls is not None
    texts = [d[lang] for d in _docs() for lang in ("en", "zh")]
    bodies = [f"{t}\n\n{t} {i}" for i in range(copies) for t in texts]
    # Baseline: the same model embedding the same texts directly, batched the same way.
    t0 = time.perf_counter()
    for at in range(0, len(bodies), 64):
        await gateway.model_calls.embed("embedder", bodies[at : at + 64])
    direct_s = time.perf_counter() - t0
    files = [
        await kb.files.create(ADMIN, Upload(f"doc{i}.txt", "assistants", b.encode()))
        for i, b in enumerate(bodies)
    ]
    store = await kb.stores.create(ADMIN, NewStore(name="ingest"))
    t0 = time.perf_counter()
    from app.knowledge.stores import FileSpec

    await kb.stores.create_batch(ADMIN, store.store.id, [FileSpec(f.id) for f in files], None)
    await _wait_indexed(gateway, store.store.id, len(files))
    ingest_s = time.perf_counter() - t0
    async with kb.db.session() as session:
        from sqlalchemy import func, select

        chunks = int(await session.scalar(select(func.count()).select_from(Chunk)) or 0)
    await gateway.aclose()
    return [
        ["embed only (baseline)", len(bodies), f"{len(bodies) / direct_s:,.1f}", f"{direct_s:.2f}"],
        [
            "ingest (extract+chunk+embed+index)",
            chunks,
            f"{chunks / ingest_s:,.1f}",
            f"{ingest_s:.2f}",
        ],
    ]


# -- quality ----------------------------------------------------------------------------------


Ranker = Callable[[str], Awaitable[list[int]]]


async def quality(model: str) -> list[list[Any]]:
    folder = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    gateway = _gateway(model, f"sqlite+aiosqlite:///{folder / 'kb.db'}")
    await gateway.start()
    kb = gateway.knowledge
    assert kb is not None
    docs = _docs()
    store = await kb.stores.create(ADMIN, NewStore(name="quality"))
    store_id = store.store.id
    gold: dict[str, str] = {}
    from app.knowledge.stores import FileSpec

    specs = []
    for doc in docs:
        for lang in ("en", "zh"):
            record = await kb.files.create(
                ADMIN, Upload(f"{doc['id']}.{lang}.txt", "assistants", doc[lang].encode())
            )
            gold[record.id] = doc["id"]
            specs.append(FileSpec(record.id))
    await kb.stores.create_batch(ADMIN, store_id, specs, None)
    await _wait_indexed(gateway, store_id, len(specs))
    async with kb.db.session() as session:
        from sqlalchemy import select

        rows_of = (
            await session.execute(
                select(Chunk.id, Chunk.file_id, Chunk.text).where(Chunk.store_id == store_id)
            )
        ).all()
    file_of = {r[0]: r[1] for r in rows_of}
    text_of = {r[0]: r[2] for r in rows_of}
    embed = kb.searcher.embed_query
    model_id = (await kb.stores.view(ADMIN, store_id)).store.embedding_model

    calls = gateway.model_calls
    assert calls is not None

    async def rankings(q: str) -> Rankings:
        index = await kb.cache.index(store_id)
        t = text_ranking(index, q, 40, None)
        v = vector_ranking(index, await embed(model_id, q), 40, None)
        # The rerank stage as knowledge.rerank_model = the embedding model would run it: the
        # fused top 20 reordered by embedding similarity (a bi-encoder, not a cross-encoder).
        head = reciprocal_rank_fusion([t, v])[:20]
        scores = await calls.rerank("embedder", q, [text_of[c] for c, _ in head])
        r = sorted(((c, s) for (c, _), s in zip(head, scores, strict=True)), key=lambda p: -p[1])
        return t, v, r

    methods: dict[str, Callable[[Rankings], Ranking]] = {
        "full text": lambda x: x[0],
        "vector": lambda x: x[1],
        "hybrid (RRF)": lambda x: reciprocal_rank_fusion(x[:2]),
        "hybrid (linear)": lambda x: linear_fusion(x[:2]),
        "hybrid (RRF k=10)": lambda x: reciprocal_rank_fusion(x[:2], k=10),
        "hybrid (RRF text 0.5)": lambda x: reciprocal_rank_fusion(x[:2], weights=[0.5, 1.0]),
        "hybrid (RRF) + rerank": lambda x: x[2],
    }
    rows = []
    for lang in ("en", "zh"):
        for kind in ("keyword", "paraphrase", "identifier", "all"):
            questions = [
                (q, doc["id"]) for doc in docs for k, q in doc["q"][lang] if kind in ("all", k)
            ]
            if not questions:
                continue
            ranked = [(await rankings(q), answer) for q, answer in questions]
            for name, method in methods.items():
                hits5, rr = 0, 0.0
                for found, answer in ranked:
                    order: list[str] = []
                    for chunk_id, _ in method(found):
                        topic = gold[file_of[chunk_id]]
                        if topic not in order:
                            order.append(topic)
                    if answer in order[:5]:
                        hits5 += 1
                    if answer in order:
                        rr += 1.0 / (order.index(answer) + 1)
                rows.append(
                    [
                        lang,
                        kind,
                        name,
                        len(ranked),
                        f"{hits5 / len(ranked):.3f}",
                        f"{rr / len(ranked):.3f}",
                    ]
                )
    await gateway.aclose()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="latency,ingest,quality")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", type=int, default=384, help="vector size of the latency stores")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default="llamacpp:all-minilm-l6-v2", help="embedding backend")
    parser.add_argument("--copies", type=int, default=4, help="ingest: copies of the set")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if "latency" in parts:
        rows = []
        databases = [
            ("sqlite", lambda: f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='kb-bench-')}/kb.db")
        ]
        if not args.no_postgres:
            databases.append(("postgresql", lambda: POSTGRES))
        for size in (int(s) for s in args.sizes.split(",")):
            for label, url in databases:
                try:
                    rows.append(await latency(url(), label, size, args.dims, args.queries))
                except OSError as exc:
                    print(f"{label}: skipped ({exc})")
        table(
            f"Search latency, ms (p50 / p99 over {args.queries} queries; {args.dims}-d vectors, "
            "top 40 per method, 10 returned)",
            [
                "database",
                "chunks",
                "insert/s",
                "cold ms",
                "MB (vectors + postings)",
                "full text",
                "vector",
                "hybrid search",
            ],
            rows,
        )
    if "ingest" in parts:
        table(
            f"Ingestion with {args.model} (2 workers, batches of 64)",
            ["path", "chunks", "chunks/s", "seconds"],
            await ingest(args.model, args.copies),
        )
    if "quality" in parts:
        table(
            f"Retrieval quality with {args.model} "
            "(top-5 recall and MRR of the document holding the answer)",
            ["lang", "questions", "method", "n", "recall@5", "MRR"],
            await quality(args.model),
        )


if __name__ == "__main__":
    asyncio.run(main())
