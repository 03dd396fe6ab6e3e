"""OpenAI's own routes: chat, completions, embeddings, rerank, FIM, models."""
