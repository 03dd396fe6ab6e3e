"""`python -m app` runs the clawbot command line."""

from __future__ import annotations

from app.ops.cli import main

raise SystemExit(main())
