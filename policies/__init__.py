"""Request policies: each a class with `async check(ctx)` that passes or raises."""
