"""The knowledge base: files, vector stores, their ingestion and hybrid retrieval.

No web framework here; `app/api/knowledge/` serves it, `app/core/` grounds answers in it.
"""
