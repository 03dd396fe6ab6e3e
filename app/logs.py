"""The gateway's log: one handler for every logger (ours and uvicorn's), JSON or text lines,
size-based rotation that several worker processes can share, keys redacted, and the access log.

`setup_logging(config)` installs it at start-up; `log_access(exchange)` writes the one access
line of a finished request. The id of the request being served rides in a context variable
(`REQUEST_ID`, set by `Accounting`), so any line logged while serving it carries it.

Access lines are the one per-request cost here, so while clawbot's handler is the only place
they would go (nothing else listens on their loggers) they skip `logging`'s record, dispatch
and filters and are written straight through that handler: the same line for about a third
less CPU (in a running server some 40 µs a line instead of 60). Anything listening (a test's
capture, an embedding application's handler) gets them as ordinary records.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec

from app.config import Config, ConfigError, model_deployments

ACCESS_LOGGER = "clawbot.access"
REDACTED = "[redacted]"
KEY_PATTERN = r"sk-clawbot-[A-Za-z0-9_\-]+|tok-clawbot-[A-Za-z0-9_.\-]+"
"""API keys and short-lived tokens, wherever they appear in a line."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "clawbot"
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
_CHATTY_LOGGERS = {"httpx": logging.WARNING, "aiosqlite": logging.INFO}
"""Lowest level written for libraries that log per call: httpx a line per upstream request (the
access line says it), aiosqlite two per SQL statement, with its parameters."""

REQUEST_ID: ContextVar[str | None] = ContextVar("clawbot_request_id", default=None)
"""The id of the request being served in this context, if any."""

_access = logging.getLogger(ACCESS_LOGGER)


class RequestIdFilter(logging.Filter):
    """Tags each record with the id of the request being served when it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class Redactor:
    """Finds API keys, tokens and the configured secrets in text and replaces them."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        literals = {s for s in secrets if s}
        literals |= {msgspec.json.encode(s).decode()[1:-1] for s in literals}  # as in JSON
        ordered = sorted(literals, key=len, reverse=True)
        self._pattern = re.compile("|".join([KEY_PATTERN, *map(re.escape, ordered)]))

    def redact(self, text: str) -> str:
        """`text` with every key, token and secret replaced by `[redacted]`."""
        return self._pattern.sub(REDACTED, text)

    def scrub(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` with the string values redacted (the same dict when there is nothing to)."""
        if not self._pattern.search("\n".join(_strings(fields))):
            return fields
        return {k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()}


class RedactingFilter(logging.Filter):
    """Replaces API keys, tokens and the configured secrets in a record with `[redacted]`.

    A safety net: nothing should log them in the first place. It rewrites the message (its
    arguments merged in), the exception and stack text, and the string values of `fields`.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor
        self._exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor.redact
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it when formatting
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exceptions.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            record.fields = self.redactor.scrub(fields)
        return True


def _strings(fields: dict[str, Any]) -> Iterator[str]:
    return (v for v in fields.values() if isinstance(v, str))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The request id (when known) and the record's `fields`."""
    request_id = getattr(record, "request_id", None)
    fields: dict[str, Any] | None = getattr(record, "fields", None)
    if not request_id:
        return fields or {}
    return {"request_id": request_id, **fields} if fields else {"request_id": request_id}


class LineFormatter(logging.Formatter):
    """A formatter that can also write a line from its parts, without a `LogRecord`."""

    def line(
        self, created: float, level: str, logger: str, message: str, extras: dict[str, Any]
    ) -> str:
        """The line of a record with these parts (no exception)."""
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """One JSON object per line: ts (UTC, ms), level, logger, message, request_id, the record's
    `fields`, and `exception` / `stack` text when there is some."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder(enc_hook=str)
        self._second = -1
        self._second_text = ""

    def _parts(
        self, created: float, level: str, logger: str, message: str, extras: dict[str, Any]
    ) -> dict[str, Any]:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        millis = int((created - second) * 1000)
        ts = f"{self._second_text}.{millis:03d}Z"
        return {"ts": ts, "level": level, "logger": logger, "message": message, **extras}

    def line(
        self, created: float, level: str, logger: str, message: str, extras: dict[str, Any]
    ) -> str:
        return self._encoder.encode(self._parts(created, level, logger, message, extras)).decode()

    def format(self, record: logging.LogRecord) -> str:
        line = self._parts(
            record.created, record.levelname, record.name, record.getMessage(), _extras(record)
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(line).decode()


class TextFormatter(LineFormatter):
    """`time LEVEL logger: message`, then `key=value` for the request id and `fields`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record) + _text_extras(_extras(record))

    def line(
        self, created: float, level: str, logger: str, message: str, extras: dict[str, Any]
    ) -> str:
        stamp = time.strftime(self.default_time_format, self.converter(created))
        millis = int((created - int(created)) * 1000)
        return f"{stamp},{millis:03d} {level} {logger}: {message}{_text_extras(extras)}"


def _text_extras(extras: dict[str, Any]) -> str:
    return "".join(f" {k}={_text_value(v)}" for k, v in extras.items())


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class LineHandler(logging.Handler):
    """What clawbot's handlers add: writing a finished line, and an access line from its parts
    (redacted, formatted, written: what a record would have become)."""

    redactor: Redactor = Redactor()

    def write_line(self, line: str) -> None:
        """Write one formatted line (the handler's lock held)."""
        raise NotImplementedError

    def write_access(self, message: str, request_id: str, fields: dict[str, Any]) -> None:
        """Write an access line: logger `clawbot.access`, level INFO, now."""
        formatter = self.formatter
        assert isinstance(formatter, LineFormatter)
        extras = {"request_id": request_id, **self.redactor.scrub(fields)}
        message = self.redactor.redact(message)
        line = formatter.line(time.time(), "INFO", ACCESS_LOGGER, message, extras)
        self.acquire()
        try:
            self.write_line(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": message}))
        finally:
            self.release()


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler, LineHandler):
    """A `RotatingFileHandler` that worker processes can share (and that formats a line once).

    The process that finds the file full rotates it while holding a lock on it; the others,
    and every process after an outside tool (logrotate) moved the file, notice that the path
    names another file and reopen it. `max_bytes` 0 never rotates; `backup_count` 0 keeps no
    old file (the log starts over).
    """

    path_check_s = 1.0
    """How often the path is checked for a file moved away by someone else."""

    def __init__(self, path: str, max_bytes: int, backup_count: int) -> None:
        # delay: the file is opened by `_file`, which notes its identity
        super().__init__(
            path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True
        )
        self._identity = (0, 0)
        self._regular = True
        self._next_path_check = 0.0
        self._file()

    def _file(self, *, reopen: bool = False) -> TextIO:
        """The open log file; opened anew if `reopen` or if it was closed."""
        if self.stream is not None and not reopen:
            return self.stream
        if self.stream is not None:
            self.stream.close()
        stream = self.stream = self._open()
        st = os.fstat(stream.fileno())
        self._identity = (st.st_dev, st.st_ino)
        self._regular = stat.S_ISREG(st.st_mode)
        return stream

    def _size(self, *, check_path: bool = False) -> int | None:
        """The size of the open file (None if it is not a regular file: a pipe, /dev/stdout,
        never rotated). Every `path_check_s`, or if `check_path`, first make sure that it is
        still the file at the path, and reopen the path if not.

        A file another process rotated away was full, so the next line's size check here
        brings this process to `_rotate_if_full`, which checks the path: a line or two at most
        go to the rotated file. Only a file moved by someone else (logrotate) waits for the
        periodic check of the path (`os.fstat` costs far less than `os.stat` on a path).
        """
        stream = self._file()
        if not self._regular:
            return None
        now = time.monotonic()
        if not check_path and now < self._next_path_check:
            return os.fstat(stream.fileno()).st_size
        self._next_path_check = now + self.path_check_s
        try:
            st = os.stat(self.baseFilename)
        except FileNotFoundError:
            self._file(reopen=True)
            return 0
        if (st.st_dev, st.st_ino) != self._identity:
            return os.fstat(self._file(reopen=True).fileno()).st_size
        return st.st_size

    def _shift(self) -> None:
        """Rename the file to `.1`, `.1` to `.2`…, dropping the oldest (the file is still open:
        closing it would release the lock before the renames are done)."""
        base = self.baseFilename
        if not self.backupCount:
            os.remove(base)
            return
        for i in range(self.backupCount - 1, 0, -1):
            older = self.rotation_filename(f"{base}.{i}")
            if os.path.exists(older):
                os.replace(older, self.rotation_filename(f"{base}.{i + 1}"))
        os.replace(base, self.rotation_filename(f"{base}.1"))

    def _rotate_if_full(self, adding: int) -> None:
        stream = self._file()
        fcntl.lockf(stream.fileno(), fcntl.LOCK_EX)
        try:
            size = self._size(check_path=True)  # another process may have rotated it
            if size and self.stream is stream and size + adding > self.maxBytes:
                self._shift()
                self._file(reopen=True)  # closing the old file releases the lock
        finally:
            if not stream.closed:
                fcntl.lockf(stream.fileno(), fcntl.LOCK_UN)

    def write_line(self, line: str) -> None:
        line += self.terminator
        size = self._size()
        if self.maxBytes and size and size + len(line) > self.maxBytes:
            self._rotate_if_full(len(line))
        stream = self._file()
        stream.write(line)
        stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class StderrHandler(logging.StreamHandler[TextIO], LineHandler):
    """Writes lines to stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def write_line(self, line: str) -> None:
        self.stream.write(line + self.terminator)
        self.stream.flush()


def config_secrets(config: Config) -> list[str]:
    """Every secret the config holds or names: the master key, the token secret, upstream keys."""
    found = [config.auth.api_key, config.auth.token_secret]
    for model in config.models:
        for options in (model.options, *(d.options for d in model_deployments(model))):
            found.append(str(options.get("api_key") or ""))
            found.append(os.environ.get(str(options.get("api_key_env") or ""), ""))
        for deployment in model.deployments:
            found.append(deployment.api_key or "")
            found.append(os.environ.get(deployment.api_key_env or "", ""))
    return [s for s in found if s]


def build_handler(config: Config) -> LineHandler:
    """The handler `setup_logging` installs: file (rotating) or stderr, format, filters."""
    settings = config.logging
    handler: LineHandler
    if settings.path:
        try:
            handler = SharedRotatingFileHandler(
                settings.path, settings.max_bytes, settings.backup_count
            )
        except OSError as exc:
            raise ConfigError(
                f"logging.path: cannot open {settings.path!r} for writing: {exc.strerror}"
            ) from exc
    else:
        handler = StderrHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    handler.redactor = Redactor(config_secrets(config))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter(handler.redactor))
    return handler


def setup_logging(config: Config) -> LineHandler:
    """Send every log record, uvicorn's included, through one handler built from `logging`.

    Calling it again (a reload) replaces the handler. Access lines are INFO records: a level
    above INFO drops them too.
    """
    handler = build_handler(config)
    root = logging.getLogger()
    for old in root.handlers:
        if old.get_name() == HANDLER_NAME:
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(config.logging.level)
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    for name, floor in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
    return handler


def access_log_enabled() -> bool:
    """Whether an access line would be written (so callers skip building it when not)."""
    return _access.isEnabledFor(logging.INFO)


def write_access(message: str, request_id: str, fields: dict[str, Any]) -> None:
    """Write one access line (logger `clawbot.access`, level INFO): straight to clawbot's
    handler when it is the only one the record would reach, else as a record."""
    if not _access.isEnabledFor(logging.INFO):
        return
    direct = _sole_handler()
    if direct is not None:
        direct.write_access(message, request_id, fields)
        return
    record = _access.makeRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        0,
        message,
        (),
        None,
        extra={"request_id": request_id, "fields": fields},
    )
    _access.handle(record)


def _sole_handler() -> LineHandler | None:
    """clawbot's handler, when it is the only one an access record would reach."""
    logger: logging.Logger | None = _access
    if _access.filters:
        return None
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return None
        if not logger.propagate:
            return None
        logger = logger.parent
    handlers = logging.root.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if not isinstance(handler, LineHandler) or handler.level > logging.INFO:
        return None
    return handler if isinstance(handler.formatter, LineFormatter) else None
