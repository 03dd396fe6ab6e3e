"""Anthropic's Messages API: wire schema, bridge onto chat completions, routes."""
