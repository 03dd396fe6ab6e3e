"""Built-in tools of OpenAI's and Anthropic's platforms (web search, file search, computer use,
shell, ...), which a client may offer but this gateway cannot run, and how a request that offers
them is still served.

Agent clients offer such tools on every request (Codex sends `web_search` with
`external_web_access: false`; Anthropic's SDK users send server tools). The model may use them,
not must, so refusing the whole request would only stop the client: they are left out of what
the model sees, and the answer says so in a header and a log line. A request that *forces* one
(a `tool_choice` naming it, or `required` with nothing else left) cannot be answered honestly
and is refused. When a feature of the gateway can run one of them for real, its bridge takes it
before this rule applies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import UnsupportedParameter

if TYPE_CHECKING:
    from app.ledger.exchange import Exchange

log = logging.getLogger("clawbot.gateway")

OPENAI_BUILT_IN_TOOLS = frozenset(
    {
        "apply_patch",
        "code_interpreter",
        "computer",
        "computer_use_preview",
        "file_search",
        "image_generation",
        "local_shell",
        "mcp",
        "programmatic_tool_calling",
        "shell",
        "tool_search",
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
    }
)
"""The built-in tool types of OpenAI's Responses API: OpenAI runs them, or its models were
trained on their call formats; a chat backend can do neither. Some clients send them to chat
completions too."""

WARNING_HEADER = "x-clawbot-warning"
"""Says which offered tools the model did not see (several warnings joined by "; ")."""


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A hosted tool left out of a request: where it was and what it was."""

    param: str
    """Its place in the request, e.g. `tools[8]`."""
    kind: str
    """Its `type` (e.g. `web_search`), or its name where the type says little."""


def warning(left_out: Sequence[LeftOut]) -> str:
    """The warning text for tools left out, e.g. `tools[8] (web_search) left out: ...`."""
    places = ", ".join(f"{tool.param} ({tool.kind})" for tool in left_out)
    return (
        f"{places} left out: built-in tools of the provider's platform cannot run on this "
        "gateway, so the model sees only function tools"
    )


def note_left_out(exchange: Exchange, left_out: Sequence[LeftOut]) -> None:
    """Tell the client (a response header) and the operator (a log line) what was left out."""
    if not left_out:
        return
    text = warning(left_out)
    earlier = exchange.response_headers.get(WARNING_HEADER)
    exchange.response_headers[WARNING_HEADER] = f"{earlier}; {text}" if earlier else text
    log.info("request %s: %s", exchange.request_id, text)


def refuse_forced(kind: str, param: str) -> UnsupportedParameter:
    """The 400 for a request that forces a hosted tool this gateway cannot run."""
    return UnsupportedParameter(
        f"{param} forces the built-in tool {kind!r}, which cannot run on this gateway; offer it "
        "without forcing it (it is then left out), or use a function tool",
        param=param,
    )


def refuse_required(left_out: Sequence[LeftOut], param: str) -> UnsupportedParameter:
    """The 400 for `required` when every tool offered was a hosted one."""
    kinds = ", ".join(sorted({tool.kind for tool in left_out}))
    return UnsupportedParameter(
        f"{param} is 'required' but every tool offered is a built-in tool ({kinds}) that "
        "cannot run on this gateway; offer a function tool",
        param=param,
    )
