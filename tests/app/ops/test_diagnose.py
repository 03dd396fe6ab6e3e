"""`clawbot check` against real servers on loopback ports, one per failure it must explain."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.ops.cli import main
from app.ops.diagnose import Check
from tests.fake_upstream import Upstream, free_port

MODELS = b'{"object": "list", "data": [{"id": "served", "object": "model", "owned_by": "x"}]}'
Handler = Callable[[socket.socket, threading.Event], None]


class LoopbackServer:
    """A listening socket on 127.0.0.1 whose connections `handler` serves, TLS optional."""

    def __init__(
        self, handler: Handler, *, tls: ssl.SSLContext | None = None, backlog: int = 16
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []

    def start(self) -> LoopbackServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
            self.handler(conn, self.stop)
        except OSError:  # the client gave up on the handshake, or went away
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.sock.close()
        for conn in self.conns:
            conn.close()
        for thread in self.threads:
            thread.join(timeout=5)


def read_head(conn: socket.socket) -> bytes | None:
    """The request head, or None when the first bytes are not HTTP (a TLS ClientHello)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if not data[:1].isalpha():
            return None
    return data


def respond(
    conn: socket.socket, status: str, body: bytes, kind: str = "application/json", extra: str = ""
) -> None:
    conn.sendall(
        f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n".encode()
        + body
    )


def always(status: str, body: bytes, kind: str, extra: str = "") -> Handler:
    """The same answer to every request."""

    def handle(conn: socket.socket, _stop: threading.Event) -> None:
        if read_head(conn) is not None:
            respond(conn, status, body, kind, extra)

    return handle


def routes(table: dict[str, tuple[str, bytes, str]]) -> Handler:
    """Answers the paths in `table`, 404 elsewhere, 400 to bytes that are not HTTP."""

    def handle(conn: socket.socket, _stop: threading.Event) -> None:
        head = read_head(conn)
        if head is None:
            respond(conn, "400 Bad Request", b"Invalid HTTP request received.", "text/plain")
            return
        path = head.split(b" ")[1].decode()
        status, body, kind = table.get(path, ("404 Not Found", b'{"detail":"Not Found"}', "j"))
        respond(conn, status, body, "application/json" if kind == "j" else kind)

    return handle


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts, reads, and never answers."""
    conn.recv(65536)
    stop.wait(30)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> None:
    """`good.pem` (self-signed, for DNS:localhost only) and `expired.pem` (expired in 2020)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    subject = ("-subj", "/CN=localhost")
    openssl("req", "-x509", *ec, "-keyout", "good.key", "-out", "good.pem", "-days", "2",
            *subject, "-addext", "subjectAltName=DNS:localhost", cwd=folder)  # fmt: skip
    (folder / "index.txt").touch()
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n"
        "[p]\ncommonName = supplied\n"
    )
    openssl("req", "-new", *ec, "-keyout", "expired.key", "-out", "expired.csr",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            cwd=folder)  # fmt: skip
    openssl("ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "expired.key",
            "-in", "expired.csr", "-out", "expired.pem",
            "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", cwd=folder)  # fmt: skip


def server_context(folder: Path, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    return context


def write_config(config: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clawbot.json"
    config.setdefault("database", {"url": f"sqlite+aiosqlite:///{folder / 'clawbot.db'}"})
    path.write_text(json.dumps(config))
    return path


def run_check(config: dict[str, Any], folder: Path) -> tuple[int, dict[str, Any]]:
    """`clawbot check --json`: its exit code and report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check", "--config", str(write_config(config, folder)), "--json"])
    report: dict[str, Any] = json.loads(out.getvalue())
    return code, report


def deployment(backend: str, **extra: Any) -> dict[str, Any]:
    return {"backend": backend, **extra}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One `clawbot check --json` over a pool holding every kind of broken deployment."""
    folder = tmp_path_factory.mktemp("diagnose")
    make_certificates(folder)
    models_at_v1 = routes({"/v1/models": ("200 OK", MODELS, "j")})
    servers = {
        "silent": LoopbackServer(silent),
        "html": LoopbackServer(
            routes({"/v1/models": ("200 OK", b"<!doctype html><html>UI</html>", "text/html")})
        ),
        "status": LoopbackServer(routes({"/v1/models": ("200 OK", b'{"status": "ok"}', "j")})),
        "v1": LoopbackServer(models_at_v1),
        "root": LoopbackServer(routes({"/models": ("200 OK", MODELS, "j")})),
        "nowhere": LoopbackServer(routes({})),
        "auth": LoopbackServer(
            routes(
                {
                    "/v1/models": (
                        "401 Unauthorized",
                        b'{"error": {"message": "Invalid API key", "type": "auth"}}',
                        "j",
                    )
                }
            )
        ),
        "tls": LoopbackServer(models_at_v1, tls=server_context(folder, "good")),
        "expired": LoopbackServer(models_at_v1, tls=server_context(folder, "expired")),
        "moved": LoopbackServer(
            always("301 Moved Permanently", b"", "text/plain", "location: https://api.test/v1\r\n")
        ),
        "go-tls": LoopbackServer(  # what Go's net/http answers plain HTTP on a TLS port
            always("400 Bad Request", b"Client sent an HTTP request to an HTTPS server.\n", "t")
        ),
        "full": LoopbackServer(silent, backlog=0),  # never accepts; its queue is kept full
    }
    for name, server in servers.items():
        if name != "full":
            server.start()
    filler = socket.create_connection(("127.0.0.1", servers["full"].port), timeout=2)
    upstream = Upstream("check-ok", log_dir=folder).start()
    port = {name: s.port for name, s in servers.items()}
    good_ca = str(folder / "good.pem")
    deployments = {
        "closed": deployment(f"http://127.0.0.1:{free_port()}/v1"),
        "silent": deployment(f"http://127.0.0.1:{port['silent']}/v1"),
        "dropped": deployment(f"http://127.0.0.1:{port['full']}/v1", timeouts={"connect_s": 1}),
        "dns": deployment("http://clawbot-check.invalid/v1", timeouts={"connect_s": 3}),
        "html": deployment(f"http://127.0.0.1:{port['html']}/v1"),
        "status-page": deployment(f"http://127.0.0.1:{port['status']}/v1"),
        "no-v1": deployment(f"http://127.0.0.1:{port['v1']}"),
        "extra-v1": deployment(f"http://127.0.0.1:{port['root']}/v1"),
        "nowhere": deployment(f"http://127.0.0.1:{port['nowhere']}/api"),
        "key-unset": deployment(
            f"http://127.0.0.1:{port['auth']}/v1", api_key_env="CLAWBOT_CHECK_UNSET"
        ),
        "key-set": deployment(
            f"http://127.0.0.1:{port['auth']}/v1", api_key_env="CLAWBOT_CHECK_SET"
        ),
        "no-key": deployment(f"http://127.0.0.1:{port['auth']}/v1"),
        "self-signed": deployment(f"https://127.0.0.1:{port['tls']}/v1"),
        "wrong-name": deployment(
            f"https://127.0.0.1:{port['tls']}/v1", options={"verify": good_ca}
        ),
        "trusted": deployment(f"https://localhost:{port['tls']}/v1", options={"verify": good_ca}),
        "expired": deployment(
            f"https://127.0.0.1:{port['expired']}/v1",
            options={"verify": str(folder / "expired.pem")},
        ),
        "http-to-tls": deployment(f"http://127.0.0.1:{port['tls']}/v1"),
        "https-to-plain": deployment(f"https://127.0.0.1:{port['v1']}/v1"),
        "moved": deployment(f"http://127.0.0.1:{port['moved']}/v1"),
        "go-tls": deployment(f"http://127.0.0.1:{port['go-tls']}/v1"),
        "healthy": deployment(upstream.url, upstream_model="fake"),
        "unlisted": deployment(upstream.url),
    }
    config = {
        "models": [
            {
                "id": "pool",
                "routing": {"health_check_timeout_s": 1},
                "deployments": [{"name": name, **d} for name, d in deployments.items()],
            },
            {"id": "mock", "backend": "mock:"},
            {"id": "sick", "backend": "mock:", "options": {"healthy": False}},
        ]
    }
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("CLAWBOT_CHECK_SET", "sk-wrong")
            env.delenv("CLAWBOT_CHECK_UNSET", raising=False)
            code, report = run_check(config, folder / "run")
    finally:
        filler.close()
        upstream.stop()
        for server in servers.values():
            server.close()
    assert code == 1
    assert report["ok"] is False
    by_target = {c["target"]: c for c in report["checks"]}
    return by_target


EXPECTED = {
    # deployment: (problem, words in the message, words in the fix)
    "closed": ("connection_refused", "connection refused", "is the server running"),
    "silent": ("read_timeout", "no answer within 1 s", "hung, overloaded"),
    "dropped": ("connect_timeout", "timed out after 1 s", "firewall is dropping"),
    "dns": ("dns_failure", "cannot resolve the host name 'clawbot-check.invalid'", "DNS"),
    "html": ("not_openai", "an HTML page", "ends in /v1"),
    "status-page": ("not_openai", """not a model list ('{"status": "ok"}')""", "ends in /v1"),
    "nowhere": ("wrong_base_path", "answered 404", "add '/v1'"),
    "key-unset": ("auth_failed", "Invalid API key", "CLAWBOT_CHECK_UNSET is NOT set"),
    "key-set": ("auth_failed", "answered 401", "CLAWBOT_CHECK_SET is set here"),
    "no-key": ("auth_failed", "answered 401", "no key is configured"),
    "self-signed": ("tls_unknown_ca", "self-signed certificate", '"verify": "/path/to/ca.pem"'),
    "wrong-name": ("tls_hostname_mismatch", "not issued for '127.0.0.1'", "subjectAltName"),
    "expired": ("tls_expired", "has expired", "renew"),
    "http-to-tls": ("http_to_tls", "speaks TLS", "use https://"),
    "https-to-plain": ("https_to_plain_http", "speaks plain HTTP", "use http://"),
    "moved": ("redirect", "redirects (301) to https://api.test/v1", "the URL it redirects to"),
    "go-tls": ("http_to_tls", "speaks TLS", "use https://"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_failure_is_classified_with_a_fix(checked: dict[str, dict[str, Any]], name: str) -> None:
    problem, message, fix = EXPECTED[name]
    result = checked[f"pool/{name}"]
    assert result["ok"] is False
    assert result["problem"] == problem, result
    assert message in result["message"], result
    assert fix in result["fix"], result


def test_wrong_base_path_names_the_url_that_works(checked: dict[str, dict[str, Any]]) -> None:
    no_v1, extra_v1 = checked["pool/no-v1"], checked["pool/extra-v1"]
    assert no_v1["problem"] == extra_v1["problem"] == "wrong_base_path"
    url = no_v1["backend"]
    assert no_v1["fix"] == f"use {url}/v1 as the backend URL: it lists the models"
    assert extra_v1["fix"].startswith(f"use {extra_v1['backend'].removesuffix('/v1')} as")


def test_protocol_mismatch_fix_gives_the_corrected_url(
    checked: dict[str, dict[str, Any]],
) -> None:
    to_tls = checked["pool/http-to-tls"]
    assert to_tls["backend"].replace("http://", "https://") in to_tls["fix"]
    to_plain = checked["pool/https-to-plain"]
    assert to_plain["backend"].replace("https://", "http://") in to_plain["fix"]


def test_healthy_deployments_pass_with_latency(checked: dict[str, dict[str, Any]]) -> None:
    healthy = checked["pool/healthy"]
    assert healthy["ok"] is True
    assert healthy["message"] == "1 model(s) listed"
    assert healthy["latency_ms"] > 0
    assert healthy["note"] is None
    unlisted = checked["pool/unlisted"]
    assert unlisted["ok"] is True
    assert "does not list model 'pool'" in unlisted["note"]
    assert "fake" in unlisted["note"]
    trusted = checked["pool/trusted"]  # the fix for self-signed, applied: options.verify
    assert trusted["ok"] is True, trusted


def test_in_process_backends_are_started(checked: dict[str, dict[str, Any]]) -> None:
    assert checked["mock/default"]["ok"] is True
    assert checked["mock/default"]["message"] == "loaded"
    assert checked["sick/default"]["problem"] == "unhealthy"


def test_database_is_checked_without_creating_it(checked: dict[str, dict[str, Any]]) -> None:
    database = checked["database"]
    assert database["ok"] is True
    assert "clawbot serve` creates it" in database["message"]


def test_every_deployment_gets_one_line(checked: dict[str, dict[str, Any]]) -> None:
    targets = [t for t in checked if t.startswith("pool/")]
    assert len(targets) == 22


def test_text_output_one_line_per_check_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Upstream("check-text", log_dir=tmp_path) as upstream:
        path = write_config(
            {
                "models": [
                    {"id": "up", "backend": upstream.url, "options": {"upstream_model": "fake"}},
                    {"id": "down", "backend": f"http://127.0.0.1:{free_port()}/v1"},
                ]
            },
            tmp_path,
        )
        assert main(["check", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert re.search(
        r"^OK   up/default \[http://127\.0\.0\.1:\d+/v1\]: 1 model\(s\) listed \(\d+ ms\)$",
        out,
        re.M,
    )
    assert re.search(
        r"^FAIL down/default \[http://127\.0\.0\.1:\d+/v1\]: connection refused by .*; "
        r"fix: is the server running\?",
        err,
        re.M,
    )


def test_config_error_is_one_fail_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "clawbot.json"
    path.write_text(json.dumps({"models": [{"id": "m", "backend": "nope:x"}]}))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("FAIL config: ")
    assert "unknown backend 'nope:x'" in lines[0]
    assert main(["check", "--config", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["checks"][0]["problem"] == "config_error"


def test_unreachable_database_fails(tmp_path: Path) -> None:
    config = {
        "database": {"url": f"postgresql+asyncpg://clawbot@127.0.0.1:{free_port()}/clawbot"},
        "models": [{"id": "m", "backend": "mock:"}],
    }
    code, report = run_check(config, tmp_path)
    assert code == 1
    database = report["checks"][0]
    assert database["problem"] == "database_unreachable"
    assert "is the database server running" in database["fix"]
    assert report["checks"][1]["ok"] is True


@pytest.mark.slow
def test_in_process_model_is_loaded(tmp_path: Path) -> None:
    config = {"models": [{"id": "smol", "backend": "llamacpp:embedded", "context_length": 512}]}
    code, report = run_check(config, tmp_path)
    assert code == 0
    checks = {check["target"]: check for check in report["checks"]}
    assert list(checks) == ["cpu", "llama.cpp", "database", "smol/default"]
    assert checks["llama.cpp"]["ok"] is True
    loaded = checks["smol/default"]
    assert (loaded["ok"], loaded["message"]) == (True, "loaded")
    assert loaded["latency_ms"] > 0
    # 512 tokens is below SmolLM2's 8192: a warning that names the fix, not a failure.
    assert "below the 8192 it was trained for" in loaded["warning"]
    assert "context_length" in loaded["fix"]
    line = Check(**{k: v for k, v in loaded.items()}).line()
    assert line.startswith("WARN smol/default [llamacpp:embedded]: loaded; its context is 512")


@pytest.mark.slow
def test_full_context_has_no_warning(tmp_path: Path) -> None:
    config = {
        "models": [
            {
                "id": "smol",
                "backend": "llamacpp:embedded",
                "context_length": 8192,
                "options": {"slots": 1},
            }
        ]
    }
    code, report = run_check(config, tmp_path)
    assert code == 0
    loaded = report["checks"][-1]
    assert loaded["ok"] is True
    assert loaded["warning"] is None


def test_no_build_check_without_in_process_models(tmp_path: Path) -> None:
    code, report = run_check({"models": [{"id": "m", "backend": "mock:"}]}, tmp_path)
    assert code == 0
    assert [check["target"] for check in report["checks"]] == ["database", "m/default"]
