"""The web layer: the Litestar app, its middleware, and the routes of every wire API (OpenAI,
Responses, Anthropic, admin), with the one place where errors become wire JSON and one SSE
encoder."""
