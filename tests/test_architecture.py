"""The dependency rule of docs/ARCHITECTURE.md, read from every module's imports.

`ops -> api -> core -> {policies, routing, ledger, backends} -> the base modules`: a module may
import its own room and the rooms below it, never one above. Of the four middle rooms a policy
may read the ledger (keys, rate limits), a pool is made of backends, and the metrics read the
backends' own state; no other two see each other. No module under `app/core/` imports the web
framework, and there is no import circle, counting imports inside functions and under
`TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "backends", "policies")

RANKS = {
    "ops": 4,
    "api": 3,
    "core": 2,
    "policies": 1,
    "routing": 1,
    "ledger": 1,
    "knowledge": 1,
    "backends": 1,
}
"""A room's height; the base modules (`app.config`, `app.errors`, `app.protocol`,
`app.tokens`, `app.logs`, `app` itself) are 0."""
SIBLINGS = {
    ("policies", "ledger"),
    ("routing", "backends"),
    ("ledger", "backends"),
    ("knowledge", "ledger"),
}
"""The middle rooms that may import one another, in that direction."""
WEB_FRAMEWORKS = ("litestar", "starlette", "uvicorn")


def room_of(module: str) -> str:
    """`app.api.openai.chat` -> `api`; `backends.mock` -> `backends`; base modules -> `base`."""
    parts = module.split(".")
    if parts[0] == "app":
        if len(parts) > 1 and parts[1] == "__main__":
            return "ops"  # `python -m app` is the command line
        return parts[1] if len(parts) > 1 and parts[1] in RANKS else "base"
    return parts[0]


def rank_of(room: str) -> int:
    return RANKS.get(room, 0)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module `path` imports (absolute names, relative ones resolved), with its line:
    at the top, inside functions and under `if TYPE_CHECKING:` alike."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"  # `from app.api import scope`


def project_imports(name: str) -> set[str]:
    """The project's modules that module `name` imports."""
    return {target for _, target in imports(MODULES[name]) if target in MODULES and target != name}


def test_the_rooms_are_found() -> None:
    rooms = {room_of(name) for name in MODULES}
    assert rooms == {*RANKS, "base"}
    assert {"app.config", "app.errors", "app.protocol", "app.tokens", "app.logs"} <= {
        name for name in MODULES if room_of(name) == "base"
    }


def wrong_imports(name: str, targets: Iterable[tuple[int, str]]) -> list[str]:
    """The imports of module `name` that break the rule, one line each."""
    mine = room_of(name)
    wrong = []
    for line, target in targets:
        if target not in MODULES:
            continue
        theirs = room_of(target)
        if theirs == mine or rank_of(theirs) < rank_of(mine) or (mine, theirs) in SIBLINGS:
            continue
        wrong.append(f"line {line}: {target} ({theirs}) from {mine}")
    return wrong


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_dependency_rule(name: str) -> None:
    wrong = wrong_imports(name, imports(MODULES[name]))
    assert not wrong, f"{name} imports against docs/ARCHITECTURE.md: {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if room_of(n) == "core"))
def test_the_core_knows_no_web_framework(name: str) -> None:
    found = [
        f"line {line}: {target}"
        for line, target in imports(MODULES[name])
        if target.split(".")[0] in WEB_FRAMEWORKS
    ]
    assert not found, f"{name} imports a web framework: {found}"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_circle() -> None:
    graph = {name: project_imports(name) for name in MODULES}
    # A package's __init__ is imported with each of its modules; it may not close a circle either.
    assert circles(graph) == []


def test_a_circle_would_be_found() -> None:
    """The checker itself: a two-module circle and a longer one are reported, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert circles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_a_wrong_import_would_be_found() -> None:
    """The rule itself, on imports no module has: upward, between middle rooms the rule keeps
    apart, and from a base module into a room."""
    assert wrong_imports("app.core.gateway", [(1, "app.api.app")])
    assert wrong_imports("app.ledger.exchange", [(1, "policies.context")])
    assert wrong_imports("backends.mock", [(1, "app.routing.pool")])
    assert wrong_imports("app.logs", [(1, "app.ledger.exchange")])
    assert not wrong_imports("app.api.app", [(1, "app.core.gateway"), (2, "app.errors")])
    assert not wrong_imports("policies.api_key", [(1, "app.ledger.keys")])
