"""Where a run happened: kernel, versions, CPUs, whether inside User-Mode Linux."""

from __future__ import annotations

import os
import platform
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import cryptography
import OpenSSL
from OpenSSL import SSL

import ktls
from ktls import kernel
from ktls.suites import CIPHERS
from ktls.wire import ProtocolVersion


def ktls_missing() -> str | None:
    """Why kTLS (TLS 1.3 AES-128-GCM, both directions) can't run here, or None."""
    missing = kernel.ulp_error()
    if missing is None and not kernel.kernel_accepts(
        CIPHERS["AES-128-GCM"], ProtocolVersion.TLS1_3
    ):
        missing = "the kernel refuses AES-128-GCM for TLS 1.3"
    return missing


def inside_uml() -> bool:
    try:
        return "User Mode Linux" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def name() -> str:
    release = os.uname().release
    return f"UML {release}" if inside_uml() else f"host {release}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def describe(ktls_missing: str | None) -> dict[str, Any]:
    return {
        "name": name(),
        "kernel": os.uname().release,
        "inside_uml": inside_uml(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "ssl_openssl": ssl.OPENSSL_VERSION,
        "pyopenssl": OpenSSL.__version__,
        "pyopenssl_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "cryptography": cryptography.__version__,
        "ktls": ktls.__version__,
        "ktls_file": ktls.__file__,
        "git_commit": _git_commit(),
        "ktls_available": ktls_missing is None,
        "ktls_missing": ktls_missing,
    }
