from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.harness import write_config_dir


@pytest.fixture
def config_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a config directory as an operator would: ``config_dir(files, plugins)``."""
    counter = 0

    def make(files: dict[str, str] | None = None,
             plugins: dict[str, str] | None = None) -> Path:
        nonlocal counter
        counter += 1
        return write_config_dir(tmp_path / f"hp{counter}", files, plugins)

    return make


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_cert(tls_ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` from the test CA, as key and cert files."""
    issued = tls_ca.issue_cert("localhost", "mx.example.test")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for extra in issued.cert_chain_pems[1:]:
        with cert.open("ab") as handle:
            handle.write(extra.bytes())
    return key, cert
