"""TLS served directly (`model_server.protocol: https`): the context, and a real server."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from app.config import ConfigError, ModelServer
from app.ops.cli import main
from app.ops.tls import server_ssl_context, ssl_context_factory
from tests.conftest import MASTER_KEY
from tests.serving import Server, serve

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_cert(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec"),
            *("-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


def https(cert: Path, key: Path, min_version: str = "1.2") -> ModelServer:
    return ModelServer(
        protocol="https", tls_cert=str(cert), tls_key=str(key), tls_min_version=min_version
    )


@pytest.mark.parametrize(
    ("version", "minimum"), [("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)]
)
def test_context_has_the_minimum_version(
    certs: tuple[Path, Path], version: str, minimum: ssl.TLSVersion
) -> None:
    context = server_ssl_context(https(*certs, version))
    assert context.minimum_version == minimum
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


def test_factory_is_none_for_http() -> None:
    assert ssl_context_factory(ModelServer()) is None


def test_a_key_of_another_certificate_is_a_config_error(
    certs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, other_key = make_cert(tmp_path, "other")
    with pytest.raises(ConfigError, match=r"model_server\.tls_key: .* is not the private key"):
        server_ssl_context(https(certs[0], other_key))


def test_bad_files_name_their_key(certs: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = certs
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    with pytest.raises(ConfigError, match=r"model_server\.tls_cert: .* holds no PEM certificate"):
        server_ssl_context(https(garbage, key))
    with pytest.raises(ConfigError, match=r"model_server\.tls_cert: .* holds no PEM certificate"):
        server_ssl_context(https(key, key))  # a key where the certificate belongs
    with pytest.raises(ConfigError, match=r"model_server\.tls_key: .* holds no PEM private key"):
        server_ssl_context(https(cert, garbage))
    with pytest.raises(ConfigError, match=r"model_server\.tls_cert: cannot read"):
        server_ssl_context(https(tmp_path / "missing.crt", key))
    with pytest.raises(ConfigError, match=r"model_server\.tls_key: cannot read"):
        server_ssl_context(https(cert, tmp_path / "missing.key"))


def test_an_encrypted_key_is_a_config_error_not_a_prompt(
    certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certs
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkey", "-in", str(key), "-aes256"),
            *("-passout", "pass:secret", "-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ConfigError, match=r"model_server\.tls_key: .* is encrypted"):
        server_ssl_context(https(cert, encrypted))


def test_cert_and_key_in_one_file(certs: tuple[Path, Path], tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_text(certs[1].read_text() + certs[0].read_text())
    assert server_ssl_context(https(both, both)).minimum_version == ssl.TLSVersion.TLSv1_2


def client_context(
    cert: Path,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting only `cert`; versions below 1.2 need OpenSSL's security
    level 0 to be offered at all."""
    context = ssl.create_default_context(cafile=str(cert))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if maximum is not None and maximum < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake(server: Server, context: ssl.SSLContext) -> str:
    """The TLS version a raw handshake with `server` settles on."""
    url = urlsplit(server.base_url)
    assert url.hostname is not None
    assert url.port is not None
    with (
        socket.create_connection((url.hostname, url.port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        version = tls.version()
        assert version is not None
        return version


def https_config(cert: Path, key: Path, min_version: str) -> dict[str, object]:
    return {
        "model_server": {
            "protocol": "https",
            "tls_cert": str(cert),
            "tls_key": str(key),
            "tls_min_version": min_version,
        },
        "auth": {"api_key": MASTER_KEY},
        "models": [{"id": "mock", "backend": "mock:"}],
    }


@pytest.fixture(scope="module")
def tls12_server(
    certs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serve(https_config(*certs, "1.2"), tmp_path_factory.mktemp("tls12")) as server:
        yield server


@pytest.fixture(scope="module")
def tls13_server(
    certs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serve(https_config(*certs, "1.3"), tmp_path_factory.mktemp("tls13")) as server:
        yield server


@pytest.mark.slow
def test_sdk_over_https_verifying_the_certificate(
    tls12_server: Server, certs: tuple[Path, Path]
) -> None:
    assert tls12_server.base_url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=client_context(certs[0]), timeout=30) as http:
        client = openai.OpenAI(
            base_url=tls12_server.base_url, api_key=MASTER_KEY, http_client=http, max_retries=0
        )
        assert [m.id for m in client.models.list()] == ["mock"]
        reply = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.choices[0].message.content
        # Plain http to the TLS port gets nowhere.
        with pytest.raises(httpx.HTTPError):
            httpx.get(tls12_server.base_url.replace("https://", "http://") + "/models", timeout=30)


@pytest.mark.slow
def test_tls_12_server_refuses_tls_11(tls12_server: Server, certs: tuple[Path, Path]) -> None:
    """A client capped at TLS 1.1 is refused. Where the local OpenSSL cannot even offer 1.1
    (no ciphers at security level 0), the handshake fails on the client's side instead: the
    assertion, that no TLS 1.1 session is made, holds either way."""
    old = client_context(certs[0], minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1)
    with pytest.raises(ssl.SSLError):
        handshake(tls12_server, old)
    assert handshake(tls12_server, client_context(certs[0], maximum=ssl.TLSVersion.TLSv1_2)) == (
        "TLSv1.2"
    )


@pytest.mark.slow
def test_tls_13_server_refuses_tls_12(tls13_server: Server, certs: tuple[Path, Path]) -> None:
    capped = client_context(certs[0], maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        handshake(tls13_server, capped)
    assert handshake(tls13_server, client_context(certs[0])) == "TLSv1.3"
    with httpx.Client(verify=client_context(certs[0]), timeout=30) as http:
        r = http.get(
            f"{tls13_server.base_url}/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}
        )
        assert r.status_code == 200, r.text


def test_serve_with_a_mismatched_key_exits_with_a_config_error(
    certs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, other_key = make_cert(tmp_path, "other")
    config_path = tmp_path / "clawbot.json"
    config_path.write_text(json.dumps(https_config(certs[0], other_key, "1.2")))
    assert main(["serve", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "model_server.tls_key" in err
    assert "is not the private key" in err
