import pytest

from app.knowledge.extract import ExtractionFailed, Extractor, sniff


def make_pdf(pages: list[str]) -> bytes:
    import pypdfium2
    import pypdfium2.raw as pdfium_c

    document = pypdfium2.PdfDocument.new()
    font = pdfium_c.FPDFText_LoadStandardFont(document, b"Helvetica")
    for text in pages:
        page = document.new_page(612, 792)
        obj = pdfium_c.FPDFPageObj_NewTextObj(document, b"Helvetica", 12.0)
        encoded = (text + "\0").encode("utf-16-le")
        pdfium_c.FPDFText_SetText(
            obj, (pdfium_c.FPDF_WCHAR * (len(encoded) // 2)).from_buffer_copy(encoded)
        )
        pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, 700)
        pdfium_c.FPDFPage_InsertObject(page.raw, obj)
        pdfium_c.FPDFPage_GenerateContent(page.raw)
    del font
    import io

    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_plain_text_and_markdown_are_read_as_they_are() -> None:
    (page,) = Extractor().extract("# Title\n\nBody 正文".encode(), "notes.md")
    assert page.text == "# Title\n\nBody 正文"
    assert page.number is None


def test_utf16_with_a_bom_is_text() -> None:
    (page,) = Extractor().extract("hello".encode("utf-16"), "a.txt")
    assert page.text == "hello"


def test_html_keeps_visible_text_only() -> None:
    html = (
        b"<html><head><style>p{}</style><title>T</title></head><body><h1>Refunds</h1>"
        b"<script>x=1</script><p>Within 14&nbsp;days.</p></body></html>"
    )
    (page,) = Extractor().extract(html, "page.html")
    assert "Refunds" in page.text
    assert "Within 14\xa0days." in page.text
    assert "x=1" not in page.text
    assert "p{}" not in page.text


def test_a_pdf_text_layer_is_read_page_by_page() -> None:
    data = make_pdf(["Refunds take fourteen days", "Shipping takes three days"])
    pages = Extractor().extract(data, "policy.pdf")
    assert [p.number for p in pages] == [1, 2]
    assert "fourteen" in pages[0].text
    assert "Shipping" in pages[1].text


def test_a_pdf_without_text_needs_ocr() -> None:
    data = make_pdf([""])
    with pytest.raises(ExtractionFailed) as caught:
        Extractor().extract(data, "scan.pdf")
    assert caught.value.code == "unsupported_file"


def test_a_broken_pdf_is_an_invalid_file() -> None:
    with pytest.raises(ExtractionFailed) as caught:
        Extractor().extract(b"%PDF-1.7 garbage", "broken.pdf")
    assert caught.value.code == "invalid_file"


def test_binary_data_is_unsupported() -> None:
    with pytest.raises(ExtractionFailed) as caught:
        Extractor().extract(bytes(range(256)) * 4, "image.png")
    assert caught.value.code == "unsupported_file"


def test_unknown_suffix_that_is_text_is_read() -> None:
    (page,) = Extractor().extract(b"key = value", "settings.conf")
    assert page.text == "key = value"


def test_more_formats_plug_into_the_same_seam() -> None:
    from app.knowledge.chunking import Page

    extractor = Extractor({"png": lambda data: [Page(1, "ocr text")]})
    assert extractor.extract(b"\x89PNG....", "scan.png")[0].text == "ocr text"
    assert sniff(b"%PDF-1.4", "x.bin") == "pdf"
