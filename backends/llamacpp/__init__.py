"""In-process GGUF models on llama.cpp: the backend, its continuous-batching engine, and what
they read and write (GGUF headers, grammars, chat text, the memory budget, the CPU build)."""
