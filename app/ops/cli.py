"""The `clawbot` command line: `serve` and `check`.

Examples:
    clawbot serve                       # clawbot.json in the current directory
    clawbot serve --config /etc/clawbot.json --port 9000
    clawbot check --config clawbot.json
    clawbot backup --out backup.tar.gz
    clawbot db upgrade
    clawbot keys create --name ci-bot --rpm 60
    clawbot usage --since 7d
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from app import __version__, logs
from app.config import (
    LOOPBACK_HOSTS,
    Config,
    ConfigError,
    deployment_label,
    load_config,
    model_deployments,
)
from app.core.gateway import Gateway
from app.ops.cli_keys import add_commands as add_admin_commands
from app.ops.cli_ops import add_commands as add_ops_commands
from app.ops.tls import ssl_context_factory
from app.ops.workers import check_workers, supervise

log = logging.getLogger("clawbot")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="clawbot", description="OpenAI-compatible gateway")
    parser.add_argument("--version", action="version", version=f"clawbot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument("--host", help="override model_server.host")
    serve_cmd.add_argument("--port", type=int, help="override model_server.port (0: any port)")
    serve_cmd.add_argument(
        "--workers", type=int, help="override model_server.workers (processes sharing the port)"
    )
    db_cmd = sub.add_parser("db", help="database schema")
    db_cmd.add_argument("action", choices=["upgrade", "current"], help="migrate, or show")
    for cmd in (serve_cmd, db_cmd):
        cmd.add_argument("--config", default="clawbot.json", help="path to clawbot.json")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": serve,
        "db": db_command,
        **add_admin_commands(sub),
        **add_ops_commands(sub),
    }
    return parser, handlers


def setup_logging(config: Config) -> None:
    """Log at `logging.level` to `logging.path`, or to stderr when it is empty (`app.logs`)."""
    logs.setup_logging(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a taken port is a clear config error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"model_server.port: {port} is already in use on {host}; "
                "stop the other server or choose another port"
            ) from exc
        raise ConfigError(f"model_server.host: cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def banner(config: Config, host: str, port: int, config_path: str = "clawbot.json") -> str:
    """What a new user needs to call the gateway: examples that work when pasted into a shell.

    The key is never printed: the examples read `$CLAWBOT_API_KEY` (the Python one through
    `os.environ`, as a single-quoted `-c` gets no shell expansion), and a comment says to set it
    when the key came from the config file. The Python example runs this interpreter, which has
    the `openai` package.
    """
    scheme = config.model_server.protocol
    shown = f"[{host}]" if ":" in host else host
    base = f"{scheme}://{shown}:{port}/v1"
    model = config.models[0].id
    lines = [f"clawbot {__version__} serving on {base}", "models:"]
    for m in config.models:
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        backends = ", ".join(deployment_label(d.backend) for d in model_deployments(m))
        lines.append(f"  {m.id}{aliases}  [{backends}]")
    lines.append("try it:")
    keyed = bool(config.auth.api_key)
    if keyed and os.environ.get("CLAWBOT_API_KEY") != config.auth.api_key:
        lines.append(f"  # first: export CLAWBOT_API_KEY=<auth.api_key of {config_path}>")
    auth_header = ' -H "Authorization: Bearer $CLAWBOT_API_KEY"' if keyed else ""
    api_key = 'os.environ["CLAWBOT_API_KEY"]' if keyed else '"none"'
    lines += [
        f"  curl {base}/chat/completions{auth_header} -H 'content-type: application/json' \\",
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
        f"  {shlex.quote(sys.executable)} -c 'import os; from openai import OpenAI; "
        f'c = OpenAI(base_url="{base}", api_key={api_key}); '
        f'print(c.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)\'',
    ]
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    """Load config, bind, and serve until interrupted (in `--workers` processes if asked)."""
    config = load_config(args.config)
    setup_logging(config)
    host = args.host or config.model_server.host
    port = config.model_server.port if args.port is None else args.port
    workers = config.model_server.workers if args.workers is None else args.workers
    if not config.auth.api_key and host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"refusing to listen on {host} without an API key: set auth.api_key in "
            f"{args.config} or CLAWBOT_API_KEY, or bind to 127.0.0.1"
        )
    check_workers(config, workers)
    gateway = Gateway.from_config(config)  # a bad backend spec fails here, before binding
    ssl_context_factory(config.model_server)  # and so does a bad TLS certificate or key
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]

    def announce() -> None:
        print(banner(config, host, bound_port, str(args.config)), flush=True)

    if workers == 1:
        return run_server(config, gateway, sock, announce, config_path=args.config)
    del gateway  # each worker builds its own after the fork
    return supervise(
        workers,
        lambda ready: run_server(
            config, Gateway.from_config(config), sock, ready, config_path=args.config
        ),
        announce,
    )


def run_server(
    config: Config,
    gateway: Gateway,
    sock: socket.socket,
    on_ready: Callable[[], None],
    *,
    config_path: str | None = None,
) -> int:
    """Serve `gateway` on the bound `sock` until SIGTERM/SIGINT; `on_ready` once it serves;
    edits to `config_path` (and SIGHUP) are applied live."""
    import uvicorn

    from app.api.app import create_app

    server_config = uvicorn.Config(
        create_app(gateway, on_ready=on_ready, config_path=config_path),
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
        ssl_context_factory=ssl_context_factory(config.model_server),
        proxy_headers=False,  # model_server.trusted_proxies decides, in app.api.middleware.edge
    )
    server = uvicorn.Server(server_config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def db_command(args: argparse.Namespace) -> int:
    """`clawbot db upgrade` applies pending migrations; `current` prints the revision."""
    from app.ledger.storage.database import Database, head_revision

    config = load_config(args.config)
    database = Database(config.database.url)

    async def run() -> str | None:
        try:
            if args.action == "upgrade":
                return await database.upgrade()
            return await database.revision()
        finally:
            await database.aclose()

    try:
        revision = asyncio.run(run())
    except (OSError, SQLAlchemyError) as exc:
        print(f"clawbot: database {database.url} failed: {exc}", file=sys.stderr)
        return 1
    head = head_revision()
    state = "up to date" if revision == head else f"behind (newest is {head})"
    print(f"{database.url}: revision {revision or 'none'}, {state}")
    return 0 if revision == head or args.action == "current" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clawbot` console script."""
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"clawbot: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
