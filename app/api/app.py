"""The ASGI application: Litestar routes behind the `Edge` wrapper."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.types import ASGIApp

from app.api import admin, health, openapi
from app.api.admin import keys as admin_keys
from app.api.admin import metrics as admin_metrics
from app.api.admin import ui as admin_ui
from app.api.anthropic import routes as messages_api
from app.api.errors import error_response
from app.api.knowledge import files as knowledge_files
from app.api.knowledge import vector_stores
from app.api.middleware.accounting import Accounting
from app.api.middleware.edge import AdminAllowlist, Edge
from app.api.middleware.pin import PinGateway, serving_gateway
from app.api.openai import chat, completions, embeddings, fim, models, rerank
from app.api.responses import routes as responses_api
from app.core.gateway import Gateway
from app.core.reload import Reloader
from app.ledger import metrics


def build_litestar(
    gateway: Gateway,
    on_ready: Callable[[], None] | None = None,
    reloader: Reloader | None = None,
) -> Litestar:
    """The Litestar app serving `gateway` (through `reloader`, which may replace it); starting
    it loads the models, then calls `on_ready`."""
    reloader = reloader or Reloader(gateway)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            await reloader.start()
            if gateway.metrics is not None:
                gateway.metrics.start()
            # Start-up objects (models, config, routes) live forever; keeping them out of the
            # collector's generations shortens GC pauses on the request path.
            gc.freeze()
            if on_ready is not None:
                on_ready()
            yield
        finally:
            if gateway.metrics is not None:
                await gateway.metrics.aclose()
            await reloader.aclose()

    return Litestar(
        route_handlers=[
            chat.chat_completions,
            messages_api.create_message,
            messages_api.count_message_tokens,
            responses_api.create_response,
            completions.completions,
            embeddings.embeddings,
            rerank.rerank,
            fim.fim_completions,
            models.list_models,
            models.retrieve_model,
            health.health,
            health.ready,
            admin_metrics.metrics_endpoint,
            admin_keys.issue_token,
            *knowledge_files.routes(gateway.config.knowledge),
            *vector_stores.ROUTES,
            admin.router,
            *admin_ui.routes(),
            openapi.openapi_json,
            *openapi.docs_routes(),
        ],
        dependencies={"gateway": Provide(serving_gateway, sync_to_thread=False)},
        exception_handlers={Exception: error_response},
        lifespan=[lifespan],
        state=State({"gateway": gateway, "reloader": reloader}),
        request_max_body_size=gateway.config.model_server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


def create_app(
    gateway: Gateway,
    on_ready: Callable[[], None] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
) -> Edge:
    """The full ASGI app for `gateway`: edge, accounting, the request's gateway, the routes.

    With `config_path`, edits to that file (and SIGHUP) are applied live: `app.core.reload`.
    """
    reloader = Reloader(gateway, config_path)
    routes = build_litestar(gateway, on_ready, reloader)
    config = gateway.config
    inner: ASGIApp = PinGateway(routes, reloader)
    if config.policies.ip_allowlist.admin:  # restart-only, like the rest of the wrapping
        inner = AdminAllowlist(inner, config.policies.ip_allowlist.admin)
    accounting = Accounting(inner, reloader.finish, keep_bodies=config.audit.bodies)
    if config.metrics.enabled:
        gateway.metrics = metrics.Metrics(gateway, in_flight=lambda: accounting.in_flight)

    def swapped(old: Gateway, new: Gateway) -> None:
        routes.state.gateway = new
        accounting.keep_bodies = new.config.audit.bodies
        new.metrics = old.metrics
        if new.metrics is not None:
            new.metrics.bind(new)

    reloader.on_swap.append(swapped)
    return Edge(accounting, trusted_proxies=config.model_server.trusted_proxies)
