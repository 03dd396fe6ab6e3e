"""The rate-limit policy over every storage: admits, refuses, leaves its Admission behind."""

from __future__ import annotations

import pytest

from app.errors import RateLimited
from app.ledger.ratelimit import Admission, Limits
from policies.context import RequestContext
from policies.rate_limit import RateLimitPolicy
from tests.app.ledger.test_ratelimit import LimiterFactory, make_limiter

__all__ = ["make_limiter"]  # the parametrized storage fixture, shared with the limiter's suite


def per_key_and_model(ctx: RequestContext) -> list[tuple[str, Limits]]:
    subjects = [(f"key:{ctx.key_id}", Limits(requests_per_minute=2, tokens_per_minute=100))]
    if ctx.model is not None:
        subjects.append((f"model:{ctx.model}", Limits(max_parallel=1)))
    return subjects


def request(key_id: str = "k1", model: str | None = None, tokens: int = 10) -> RequestContext:
    return RequestContext(
        request_id="req-1",
        client_ip="127.0.0.1",
        route="/v1/chat/completions",
        credential=None,
        key_id=key_id,
        model=model,
        token_estimate=tokens,
    )


async def test_admits_and_leaves_the_admission(make_limiter: LimiterFactory) -> None:
    policy = RateLimitPolicy(make_limiter(), per_key_and_model)
    assert policy.name == "rate_limit"
    ctx = request(tokens=30)
    await policy.check(ctx)
    admission = ctx.admission
    assert admission is not None
    assert isinstance(admission, Admission)
    assert admission.headers()["x-ratelimit-remaining-requests"] == "1"
    assert admission.headers()["x-ratelimit-remaining-tokens"] == "70"


async def test_refuses_past_the_key_limit(make_limiter: LimiterFactory) -> None:
    policy = RateLimitPolicy(make_limiter(), per_key_and_model)
    for _ in range(2):
        await policy.check(request())
    refused = request()
    with pytest.raises(RateLimited, match="requests per minute"):
        await policy.check(refused)
    assert refused.admission is None
    await policy.check(request(key_id="k2"))


async def test_model_wide_parallel_limit_across_keys(make_limiter: LimiterFactory) -> None:
    policy = RateLimitPolicy(make_limiter(), per_key_and_model)
    first = request(key_id="k1", model="m")
    await policy.check(first)
    with pytest.raises(RateLimited, match="parallel requests"):
        await policy.check(request(key_id="k2", model="m"))
    assert first.admission is not None
    await first.admission.release(5)
    await policy.check(request(key_id="k2", model="m"))


async def test_no_limits_means_no_admission(make_limiter: LimiterFactory) -> None:
    policy = RateLimitPolicy(make_limiter(), lambda ctx: [])
    ctx = request()
    await policy.check(ctx)
    assert ctx.admission is None
