"""The admin API (keys, usage, errors, backends, tokens, metrics, reload) and its dashboard."""
