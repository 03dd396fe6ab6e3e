"""Any OpenAI-compatible HTTP server as a backend, over a transport of our own."""
