"""What is recorded about keys and requests: the exchange, keys, rate limits, audit, metrics,
and the database they live in."""
