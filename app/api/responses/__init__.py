"""OpenAI's Responses API: wire schema, bridge onto chat completions, routes."""
