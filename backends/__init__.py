"""Model backends: in-process llama.cpp, remote OpenAI-compatible HTTP, and a mock."""
