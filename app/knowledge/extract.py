"""Text out of an uploaded file, page by page: the one seam every format goes through.

A format is recognised by its content first (PDF's `%PDF-`, HTML's tags) and its file name
second; each has an `Extract` function. Ingestion is handed an `Extractor` holding the table,
so another room (documents: OCR, DOCX) adds formats by building one with more entries.
"""

from __future__ import annotations

import codecs
import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePath
from types import MappingProxyType

from app.knowledge.chunking import Page

Extract = Callable[[bytes], list[Page]]


class ExtractionFailed(Exception):
    """The file cannot be read as text; `code` is the vector store file's `last_error.code`."""

    def __init__(self, message: str, *, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.code = code


TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".text",
        ".md",
        ".markdown",
        ".rst",
        ".csv",
        ".tsv",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".log",
        ".xml",
        ".py",
        ".js",
        ".ts",
        ".tsx",
        ".jsx",
        ".java",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cs",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".sh",
        ".sql",
        ".swift",
        ".kt",
        ".scala",
        ".lua",
        ".pl",
        ".r",
        ".m",
        ".tex",
        ".css",
        ".scss",
        ".vue",
        ".svelte",
    ]
)


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is not text."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionFailed(
            f"the file is not UTF-8 text (byte {exc.start} is invalid)", code="unsupported_file"
        ) from None
    if "\x00" in text:
        raise ExtractionFailed("the file is binary, not text", code="unsupported_file")
    return text


def extract_text(data: bytes) -> list[Page]:
    """Plain text, Markdown, source code: the text itself."""
    return [Page(number=None, text=decode_text(data))]


class _HtmlText(HTMLParser):
    """Visible text of a page, a line break per block element; scripts and styles dropped."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    _BLOCK = frozenset(
        [
            "p",
            "div",
            "br",
            "li",
            "ul",
            "ol",
            "tr",
            "table",
            "section",
            "article",
            "header",
            "footer",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "pre",
            "blockquote",
            "dt",
            "dd",
            "title",
        ]
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def extract_html(data: bytes) -> list[Page]:
    """HTML: its visible text."""
    parser = _HtmlText()
    parser.feed(decode_text(data))
    parser.close()
    text = html.unescape("".join(parser.parts))
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\n\s*\n\s*", "\n\n", text)
    return [Page(number=None, text=text.strip())]


def extract_pdf(data: bytes) -> list[Page]:
    """A PDF's text layer, page by page (numbered from 1, for citations)."""
    import pypdfium2

    try:
        document = pypdfium2.PdfDocument(data)
    except pypdfium2.PdfiumError as exc:
        raise ExtractionFailed(f"the PDF cannot be opened: {exc}") from None
    try:
        pages = []
        for index in range(len(document)):
            page = document[index]
            textpage = page.get_textpage()
            try:
                text = textpage.get_text_range().replace("\r\n", "\n")
            finally:
                textpage.close()
                page.close()
            pages.append(Page(number=index + 1, text=text))
    finally:
        document.close()
    if not any(p.text.strip() for p in pages):
        raise ExtractionFailed(
            "the PDF has no text layer (a scan: it needs OCR)", code="unsupported_file"
        )
    return pages


BUILTIN_EXTRACTORS: Mapping[str, Extract] = MappingProxyType(
    {"text": extract_text, "html": extract_html, "pdf": extract_pdf}
)


def sniff(data: bytes, filename: str) -> str:
    """The format of a file: by its first bytes, then by its name's suffix; "text" if neither
    says otherwise (decoding then tells whether it really is)."""
    head = data[:1024].lstrip().lower()
    if data.startswith(b"%PDF-"):
        return "pdf"
    suffix = PurePath(filename).suffix.lower()
    if suffix in (".html", ".htm", ".xhtml") or head.startswith((b"<!doctype html", b"<html")):
        return "html"
    return suffix.lstrip(".") if suffix and suffix not in TEXT_SUFFIXES else "text"


@dataclass(frozen=True, slots=True)
class Extractor:
    """Extraction by format; built with more formats than the built-in ones where needed."""

    formats: Mapping[str, Extract] = field(default_factory=lambda: BUILTIN_EXTRACTORS)

    def extract(self, data: bytes, filename: str) -> list[Page]:
        """The file's pages; ExtractionFailed when its format is unknown or it is unreadable."""
        kind = sniff(data, filename)
        handler = self.formats.get(kind)
        if handler is not None:
            return handler(data)
        try:  # an unknown suffix may still be text (a .conf, a .dat of CSV)
            return extract_text(data)
        except ExtractionFailed:
            raise ExtractionFailed(
                f"files of type {kind!r} cannot be read ({filename})", code="unsupported_file"
            ) from None
