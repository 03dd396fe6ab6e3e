"""Total token budgets: a key that has used its budget is refused until it is raised."""

from __future__ import annotations

from app.errors import RateLimited
from policies.context import RequestContext


class BudgetPolicy:
    """Refuse keys whose `spent_tokens` reached `budget_total_tokens` (429 insufficient_quota).

    Spending is added to the key's row by the audit writer's batches and reaches this
    replica's key cache on its next poll, so a key can overshoot its budget by what it uses
    within that delay. Budgets per day or month are rate-limit windows instead.
    """

    name = "budget"

    async def check(self, ctx: RequestContext) -> None:
        """Pass unless the key's total budget is used up."""
        key = ctx.key
        if key is None or key.budget_total_tokens is None:
            return
        if key.spent_tokens >= key.budget_total_tokens:
            raise RateLimited(
                f"this API key has used its budget of {key.budget_total_tokens} tokens",
                code="insufficient_quota",
            )
