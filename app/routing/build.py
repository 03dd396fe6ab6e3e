"""Builds each model's pool of deployments from clawbot.json."""

from __future__ import annotations

from typing import Any

import msgspec

from app.config import ConfigError, DeploymentConfig, ModelConfig, deployment_label
from app.config import model_deployments as deployments_of
from app.routing.pool import (
    Breaker,
    Deployment,
    LeastBusy,
    Pool,
    PriorityFailover,
    Strategy,
    WeightedRoundRobin,
)
from backends.base import BackendFactory, backend_scheme
from backends.memory import MemoryBudget
from backends.registry import build_backend

_REMOTE = frozenset({"http", "https"})


def strategy(name: str) -> Strategy:
    """The strategy called `name` in clawbot.json (one instance per pool: it keeps state)."""
    if name == "weighted_round_robin":
        return WeightedRoundRobin()
    if name == "least_busy":
        return LeastBusy()
    return PriorityFailover()


def deployment_options(
    model: ModelConfig, dep: DeploymentConfig, where: str = "deployment"
) -> dict[str, Any]:
    """The backend options of one deployment: the model's, the deployment's, then its sugar."""
    options = {**model.options, **dep.options}
    remote = {
        "upstream_model": dep.upstream_model,
        "api_key": dep.api_key,
        "api_key_env": dep.api_key_env,
        "connect_timeout_s": dep.timeouts.connect_s,
    }
    given = {key: value for key, value in remote.items() if value is not None}
    if given and backend_scheme(dep.backend) not in _REMOTE:
        keys = ", ".join(
            "timeouts.connect_s" if key == "connect_timeout_s" else key for key in given
        )
        raise ConfigError(f"{where}: {keys} only apply to http(s) deployments")
    return {**options, **given}


def build_pool(
    model: ModelConfig,
    *,
    index: int,
    default_timeout_s: float,
    factories: dict[str, BackendFactory] | None = None,
    memory: MemoryBudget | None = None,
) -> Pool:
    """The pool serving `model`; a single `backend` is a pool of one called `default`. Its
    in-process backends register with `memory`."""
    routing = model.routing
    deployments = []
    for j, dep in enumerate(deployments_of(model)):
        where = f"models[{index}]" if not model.deployments else f"models[{index}].deployments[{j}]"
        total_s = dep.timeouts.total_s or default_timeout_s
        spec_model = msgspec.structs.replace(
            model,
            backend=dep.backend,
            deployments=(),
            options=deployment_options(model, dep, where),
        )
        backend = build_backend(
            spec_model, timeout_s=total_s, factories=factories, where=where, memory=memory
        )
        deployments.append(
            Deployment(
                name=dep.name or deployment_label(dep.backend),
                backend=backend,
                weight=dep.weight,
                priority=dep.priority,
                max_parallel=dep.max_parallel,
                first_token_s=dep.timeouts.first_token_s,
                total_s=dep.timeouts.total_s,
                label=deployment_label(dep.backend),
            )
        )
    return Pool(
        model.id,
        deployments,
        strategy(routing.strategy),
        retries=routing.retries,
        deadline_s=routing.deadline_s or default_timeout_s,
        breaker=Breaker(
            failures_to_trip=routing.failures_to_trip,
            window_s=routing.failure_window_s,
            cooldown_s=routing.cooldown_s,
        ),
    )
