"""The ASGI application: Litestar routes behind the `Edge` wrapper."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from app import (
    admin,
    chat,
    completions,
    embeddings,
    fim,
    health,
    messages_api,
    models,
    rerank,
    responses_api,
)
from app.accounting import Accounting
from app.edge import Edge
from app.gateway import Gateway
from app.wire_errors import error_response


def _gateway(state: State) -> Gateway:
    gateway: Gateway = state.gateway
    return gateway


def build_litestar(gateway: Gateway, on_ready: Callable[[], None] | None = None) -> Litestar:
    """The Litestar app serving `gateway`; starting it loads the models, then calls `on_ready`."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            await gateway.start()
            # Start-up objects (models, config, routes) live forever; keeping them out of the
            # collector's generations shortens GC pauses on the request path.
            gc.freeze()
            if on_ready is not None:
                on_ready()
            yield
        finally:
            await gateway.aclose()

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
            admin.create_key,
            admin.list_keys,
            admin.get_key,
            admin.update_key,
            admin.revoke_key,
            admin.rotate_key,
            admin.usage,
            admin.backends,
            admin.issue_token,
        ],
        dependencies={"gateway": Provide(_gateway, sync_to_thread=False)},
        exception_handlers={Exception: error_response},
        lifespan=[lifespan],
        state=State({"gateway": gateway}),
        request_max_body_size=gateway.config.model_server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


def create_app(gateway: Gateway, on_ready: Callable[[], None] | None = None) -> Edge:
    """The full ASGI app for `gateway`: edge, then accounting, then the routes."""
    routes = build_litestar(gateway, on_ready)
    return Edge(Accounting(routes, gateway.finish, keep_bodies=gateway.config.audit.bodies))
