import itertools

from app.knowledge.chunking import Page, chunk_pages
from app.tokens import count_tokens


def test_short_text_is_one_chunk() -> None:
    (chunk,) = chunk_pages([Page(None, "Refunds take 14 days.")], 100, 20)
    assert chunk.text == "Refunds take 14 days."
    assert chunk.tokens == count_tokens("Refunds take 14 days.")


def test_chunks_respect_the_size_and_overlap() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    chunks = chunk_pages([Page(None, text)], 100, 20)
    assert len(chunks) > 5
    assert all(c.tokens <= 100 for c in chunks)
    # consecutive chunks share text (the overlap)
    for a, b in itertools.pairwise(chunks):
        assert a.text[-20:].split()[-1] in b.text
    # every sentence survives somewhere
    joined = " ".join(c.text for c in chunks)
    assert all(f"number {i} " in joined for i in range(300))


def test_chunks_end_at_sentence_breaks_when_they_can() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    chunks = chunk_pages([Page(None, text)], 100, 0)
    assert all(c.text.endswith(".") for c in chunks[:-1])


def test_chinese_characters_are_never_cut_in_half() -> None:
    text = "退款将在十四个工作日内处理完毕。" * 80
    chunks = chunk_pages([Page(None, text)], 50, 10)
    assert len(chunks) > 3
    assert all("\ufffd" not in c.text for c in chunks)
    assert all(set(c.text) <= set(text) for c in chunks)


def test_pages_are_chunked_separately_and_keep_their_numbers() -> None:
    chunks = chunk_pages([Page(1, "first page"), Page(2, "second page"), Page(3, "  ")], 100, 0)
    assert [(c.page, c.text) for c in chunks] == [(1, "first page"), (2, "second page")]
