"""Shared fixtures, and the honesty rules of the suite.

* Tests marked ``kernel`` need kernel TLS.  On a host without it they are run inside
  a User-Mode Linux kernel by ``make test`` (tools/testkernel.py); if they are ever run
  where the ULP is missing they FAIL, they never skip.
* Every test that claims an engine asserts the engine each direction really used.
* The header and the summary say which kernel the run was on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from ktls.kernel import read_tls_stat, ulp_error

from .aio import IO_STYLES, IOStyle, io_style
from .peers import Certs

ENGINES = [
    pytest.param("kernel", marks=pytest.mark.kernel, id="kernel"),
    pytest.param("software", id="software"),
]


def kernel_release() -> str:
    return os.uname().release


def pytest_report_header(config: pytest.Config) -> list[str]:
    missing = ulp_error()
    state = "available" if missing is None else f"MISSING ({missing})"
    return [f"ktls: running on Linux {kernel_release()}; kernel TLS ULP {state}"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None and ulp_error() is not None:
        pytest.fail(
            f"this test needs kernel TLS, which Linux {kernel_release()} here lacks "
            f"({ulp_error()}); `make test` runs it inside a UML kernel",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    passed = terminalreporter.stats.get("passed", [])
    on_kernel = sum(1 for r in passed if r.when == "call" and "kernel" in r.keywords)
    on_software = sum(1 for r in passed if r.when == "call" and "kernel" not in r.keywords)
    terminalreporter.write_line(
        f"ktls: Linux {kernel_release()}: {on_kernel} passed on the kernel engine, "
        f"{on_software} passed without it (software engine / no engine)"
    )
    stats = read_tls_stat()
    if stats:
        shown = " ".join(f"{k}={v}" for k, v in stats.items() if v)
        terminalreporter.write_line(f"ktls: /proc/net/tls_stat after the run: {shown}")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    rsa = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    rsa.private_key_and_cert_chain_pem.write_to_path(str(base / "server-rsa.pem"))
    ecdsa = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ecdsa.private_key_and_cert_chain_pem.write_to_path(str(base / "server-ecdsa.pem"))
    client = ca.issue_cert("client@example.test", key_type=trustme.KeyType.ECDSA)
    client.private_key_and_cert_chain_pem.write_to_path(str(base / "client.pem"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(base / "other-ca.pem"))
    return Certs(
        ca=base / "ca.pem",
        server_rsa=base / "server-rsa.pem",
        server_ecdsa=base / "server-ecdsa.pem",
        client=base / "client.pem",
        other_ca=base / "other-ca.pem",
    )


@pytest.fixture(params=IO_STYLES)
def io(request: pytest.FixtureRequest) -> Iterator[IOStyle]:
    """How the test drives its connections: the blocking API, or ktls.asyncio on the
    default event loop or on uvloop (tests/aio.py: the same calls, through transports)."""
    with io_style(request.param) as style:
        yield style


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def assert_engine(tls: object, engine: str) -> None:
    """The connection really runs on ``engine`` in both directions."""
    tx = getattr(tls, "tx_engine")  # noqa: B009 -- typed loosely on purpose
    rx = getattr(tls, "rx_engine")  # noqa: B009
    assert (tx, rx) == (engine, engine), f"expected {engine} both ways, got tx={tx} rx={rx}"


def rekey_expected(engine: str) -> bool:
    """Whether ``engine`` can change TLS 1.3 keys here (the kernel needs Linux >= 6.14)."""
    if engine == "software":
        return True
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 14)


def data_path(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"data-{size}"
    path.write_bytes(os.urandom(size))
    return path
