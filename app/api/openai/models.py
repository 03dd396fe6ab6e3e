"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from app.api.replies import json_response
from app.api.scope import arrival_of
from app.core.gateway import Gateway, ServedModel
from app.protocol import UNSET, Model, ModelCapabilities, ModelList


def model_object(served: ServedModel) -> Model:
    """The OpenAI Model object of a served model: context length, capabilities, loaded."""
    context = served.context_length
    caps = served.capabilities
    loaded = served.loaded
    return Model(
        id=served.config.id,
        created=served.created,
        owned_by=served.config.owned_by,
        context_length=UNSET if context is None else context,
        capabilities=ModelCapabilities(
            chat=caps.chat,
            completions=caps.completions,
            embeddings=caps.embeddings,
            tools=caps.tools,
            vision=caps.vision,
            json_schema=caps.json_schema,
            fim=caps.fim,
            rerank=caps.rerank or caps.embeddings,
        ),
        loaded=UNSET if loaded is None else loaded,
    )


@get("/v1/models")
async def list_models(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Every served model (aliases are accepted in requests but not listed)."""
    await gateway.admit(arrival_of(request))
    return json_response(ModelList(data=[model_object(m) for m in gateway.models]))


@get("/v1/models/{model_id:path}")
async def retrieve_model(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], model_id: FromPath[str]
) -> Response[bytes]:
    """One model by id or alias."""
    call = await gateway.admit_model(arrival_of(request), model_id.lstrip("/"))
    return json_response(model_object(call.model))
