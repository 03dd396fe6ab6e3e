"""Hot reload: clawbot.json edited, SIGHUP, or `POST /admin/reload` swaps in a new gateway.

The new gateway is built beside the running one from the edited file: models whose backends'
config is unchanged keep their backends (an in-process model is not loaded again), and the
database, key cache, rate limiter and (settings unchanged) audit writer carry over. Once it
has started it replaces the old one for new requests; requests that arrived before finish on
the old one, and whatever the new one does not share is closed when they have all finished.
Settings that only a restart can apply keep their running values, with a warning naming them.
An invalid file changes nothing; one ERROR line names the problem.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec

from app import logs
from app.config import Config, ConfigError, load_config
from app.core.gateway import Gateway
from app.ledger.exchange import Exchange
from backends.base import Backend, BackendFactory
from policies.base import Policy

log = logging.getLogger("clawbot.reload")

RESTART_ONLY = (
    "model_server.host",
    "model_server.port",
    "model_server.protocol",
    "model_server.tls_cert",
    "model_server.tls_key",
    "model_server.tls_min_version",
    "model_server.trusted_proxies",
    "model_server.workers",
    "model_server.max_body_bytes",
    "database.url",
    "rate_limits.storage",
    "policies.ip_allowlist.admin",
    "metrics.enabled",
    "memory.budget_mb",
    "knowledge",
)
"""Keys bound to the listening socket, the process or the app's construction; a reload keeps
their running values and warns."""

Fingerprint = tuple[int, int, int]
SETTLE_S = 0.1
"""A changed file is read once it has kept its size and time this long."""


class ReloadReport(msgspec.Struct, kw_only=True):
    """What one reload changed: the answer of `POST /admin/reload`."""

    object: str = "config.reload"
    trigger: str
    """What asked for it: `file change`, `SIGHUP` or `POST /admin/reload`."""
    added: list[str] = []
    """Ids of models now served that were not."""
    removed: list[str] = []
    """Ids of models no longer served."""
    changed: list[str] = []
    """Ids of models whose config changed."""
    rebuilt: list[str] = []
    """Ids of models served by new backends (added, or their backends' config changed)."""
    settings: list[str] = []
    """Other keys that changed and now apply."""
    restart_required: list[str] = []
    """Keys changed in the file that apply only after a restart; their running values stay."""
    warnings: list[str] = []
    """Each one also logged as a WARNING."""


def _lookup(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _replace(config: Any, key: str, value: Any) -> Any:
    head, _, rest = key.partition(".")
    if not rest:
        return msgspec.structs.replace(config, **{head: value})
    inner = _replace(getattr(config, head), rest, value)
    return msgspec.structs.replace(config, **{head: inner})


def settle(running: Config, edited: Config) -> tuple[Config, list[str]]:
    """`edited` with the running values of the keys only a restart applies, and those keys.

    Turning authentication off (an empty `auth.api_key`) needs a restart too: the start-up
    check that refuses to listen beyond loopback without a key must see it.
    """
    kept = []
    for key in RESTART_ONLY:
        if _lookup(edited, key) != _lookup(running, key):
            kept.append(key)
            edited = _replace(edited, key, _lookup(running, key))
    if running.auth.api_key and not edited.auth.api_key:
        kept.append("auth.api_key")
        edited = _replace(edited, "auth.api_key", running.auth.api_key)
    return edited, kept


def changed_settings(old: Config, new: Config) -> list[str]:
    """The keys outside `models` whose values differ, one level into each section."""
    keys = []
    for section in Config.__struct_fields__:
        before, after = getattr(old, section), getattr(new, section)
        if section == "models" or before == after:
            continue
        keys += [
            f"{section}.{name}"
            for name in type(before).__struct_fields__
            if getattr(before, name) != getattr(after, name)
        ]
    return keys


def _fingerprint(path: Path) -> Fingerprint | None:
    """What the watcher compares: the file's modification time, size and inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _reconfigure_logging(old: Config, new: Config) -> None:
    """Rebuild the log handler if its settings (or the secrets it redacts) changed; only when
    the process logs through clawbot's handler (an embedding application owns its logging)."""
    if old.logging == new.logging and logs.config_secrets(old) == logs.config_secrets(new):
        return
    if any(h.get_name() == logs.HANDLER_NAME for h in logging.getLogger().handlers):
        logs.setup_logging(new)


class Reloader:
    """Owns the serving gateway and replaces it when its config file changes.

    `start` starts the gateway, a task polling the file every `reload.poll_interval_s` (when
    `reload.watch`), and a SIGHUP handler; `reload` reads the file and applies it.
    """

    def __init__(
        self,
        gateway: Gateway,
        config_path: str | os.PathLike[str] | None = None,
        *,
        factories: dict[str, BackendFactory] | None = None,
        extra_policies: Sequence[Policy] = (),
    ) -> None:
        self.current = gateway
        """The gateway new requests are served by."""
        self.path = Path(config_path).absolute() if config_path is not None else None
        self.on_swap: list[Callable[[Gateway, Gateway], None]] = []
        """Called with (old, new) right after a new gateway replaced the old one."""
        self._factories = factories
        self._extra_policies = tuple(extra_policies)
        self._lock = asyncio.Lock()
        self._seen = _fingerprint(self.path) if self.path is not None else None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: list[tuple[Gateway, Gateway]] = []
        """(old, its successor) pairs whose requests are draining, oldest first."""
        self._retirer: asyncio.Task[None] | None = None
        self._closing = False
        self._sighup = False

    async def start(self) -> None:
        """Start the gateway; then watch the file and handle SIGHUP, if there is a file."""
        await self.current.start()
        if self.path is None:
            return
        self._watcher = asyncio.create_task(self._watch(), name="clawbot-reload-watch")
        hup = getattr(signal, "SIGHUP", None)
        if hup is not None:
            try:
                asyncio.get_running_loop().add_signal_handler(hup, self._on_sighup)
                self._sighup = True
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                log.info("SIGHUP is not handled here; edit the file or POST /admin/reload")

    async def aclose(self) -> None:
        """Stop watching, close retired gateways without waiting further, then the current one."""
        self._closing = True
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        pending = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._retirer is not None:
            await self._retirer
        await self.current.aclose()

    async def finish(self, exchange: Exchange) -> None:
        """`Accounting`'s finisher: settle limits and queue the audit row on the current gateway
        (the storage it uses is shared across reloads)."""
        await self.current.finish(exchange)

    async def reload(self, trigger: str = "POST /admin/reload") -> ReloadReport:
        """Read the config file again and apply it; ConfigError (logged) if it is invalid.

        The work runs in its own task, so a caller that goes away cannot stop it halfway.
        """
        task = asyncio.get_running_loop().create_task(self._run(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, if orphaned
        return await asyncio.shield(task)

    async def _run(self, trigger: str) -> ReloadReport:
        async with self._lock:  # one reload at a time
            try:
                return await self._apply(await self._read(), trigger)
            except ConfigError as exc:
                log.error(
                    "reload (%s) rejected, the previous config keeps serving: %s", trigger, exc
                )
                raise

    async def _read(self) -> Config:
        if self.path is None:
            raise ConfigError("there is no config file to reload: none was given at start")
        self._seen = _fingerprint(self.path)
        return await asyncio.to_thread(load_config, self.path)

    async def _apply(self, edited: Config, trigger: str) -> ReloadReport:
        old = self.current
        config, kept = settle(old.config, edited)
        report = ReloadReport(trigger=trigger, restart_required=kept)
        if kept:
            report.warnings.append(
                f"{', '.join(kept)} changed: restart to apply (the running values are kept)"
            )
        for warning in report.warnings:
            log.warning("reload (%s): %s", trigger, warning)
        if config == old.config:
            log.info("reload (%s): nothing to apply", trigger)
            return report
        new = await self._start_successor(old, config)
        self.current = new
        for hook in self.on_swap:
            try:
                hook(old, new)
            except Exception:
                log.exception("after reload (%s): %r failed", trigger, hook)
        self._retire(old, new)
        _describe(report, old, new)
        log.info(
            "reload (%s) applied: models added %s, removed %s, changed %s (new backends: %s); "
            "settings %s",
            trigger,
            report.added or "none",
            report.removed or "none",
            report.changed or "none",
            report.rebuilt or "none",
            report.settings or "none",
        )
        return report

    async def _start_successor(self, old: Gateway, config: Config) -> Gateway:
        """Build and start the gateway for `config`; on any failure close its new parts."""
        trips = [(served.pool, served.pool.on_trip) for served in old.models]
        new: Gateway | None = None
        try:
            new = Gateway.from_config(
                config,
                factories=self._factories,
                extra_policies=self._extra_policies,
                previous=old,
            )
            await new.start()
            _reconfigure_logging(old.config, config)
        except BaseException as exc:
            for pool, on_trip in trips:  # building router state rebinds the shared pools
                pool.on_trip = on_trip
            if new is not None:
                await new.close_replaced(old)
            if isinstance(exc, Exception) and not isinstance(exc, ConfigError):
                raise ConfigError(f"starting the new config failed: {exc!r}") from exc
            raise
        return new

    def _retire(self, old: Gateway, new: Gateway) -> None:
        """Stop the old gateway's health checks now; close its own parts once it has drained."""
        self._spawn(old.monitor.aclose())
        self._retiring.append((old, new))
        if self._retirer is None or self._retirer.done():
            self._retirer = asyncio.create_task(self._close_retired(), name="clawbot-retire")

    async def _close_retired(self) -> None:
        # In order: a part the next gateway shared with this one is closed after both drained.
        while self._retiring:
            old, new = self._retiring[0]
            await self._drain(old)
            kept = {id(b) for served in new.models for b in served.backends}
            own = {id(b) for served in old.models for b in served.backends} - kept
            try:
                await old.close_replaced(new)
            except Exception:
                log.exception("closing the previous config's backends failed")
            else:
                log.info("previous config retired: %d backend(s) only it used closed", len(own))
            self._retiring.pop(0)

    async def _drain(self, gateway: Gateway) -> None:
        """Wait until `gateway` serves no request; at most `model_server.timeout` (a call's
        longest)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gateway.config.model_server.timeout / 1000
        while gateway.in_flight > 0 and not self._closing:
            if loop.time() >= deadline:
                log.warning(
                    "%d requests still running on the previous config after %.0fs; closing its "
                    "backends anyway",
                    gateway.in_flight,
                    gateway.config.model_server.timeout / 1000,
                )
                return
            await asyncio.sleep(0.05)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_sighup(self) -> None:
        self._spawn(self._reload_quietly("SIGHUP"))

    async def _reload_quietly(self, trigger: str) -> None:
        """A reload nobody awaits: failures are logged, never raised."""
        try:
            await self.reload(trigger)
        except ConfigError:
            pass  # logged by `reload`
        except Exception:
            log.exception("reload (%s) failed", trigger)

    async def _watch(self) -> None:
        assert self.path is not None
        while True:
            await asyncio.sleep(self.current.config.reload.poll_interval_s)
            if not self.current.config.reload.watch:
                continue
            seen = _fingerprint(self.path)
            if seen is None or seen == self._seen:
                continue
            # An editor may be halfway through writing it: read it once it has stopped changing.
            await asyncio.sleep(SETTLE_S)
            if _fingerprint(self.path) == seen:
                await self._reload_quietly("file change")


def _describe(report: ReloadReport, old: Gateway, new: Gateway) -> None:
    """Fill in which models and settings changed between `old` and `new`."""
    before = {served.config.id: served for served in old.models}
    after = {served.config.id: served for served in new.models}
    report.added = [m for m in after if m not in before]
    report.removed = [m for m in before if m not in after]
    report.changed = [m for m in after if m in before and after[m].config != before[m].config]
    running: set[int] = {id(b) for served in old.models for b in served.backends}
    report.rebuilt = [m for m, served in after.items() if not _all_in(served.backends, running)]
    report.settings = changed_settings(old.config, new.config)


def _all_in(backends: Sequence[Backend], ids: set[int]) -> bool:
    return all(id(b) in ids for b in backends)
