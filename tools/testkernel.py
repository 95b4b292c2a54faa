#!/usr/bin/env python3
"""Provision and run User-Mode Linux (UML) test kernels that have kernel TLS.

The host kernel may lack kTLS (no ``CONFIG_TLS``), so tests that need it run inside a
UML kernel: a Linux kernel that is an ordinary host process.  The guest sees the host's
root filesystem over ``hostfs``, so the same checkout and virtualenv work inside.

Kernels:

* ``6.1``: Debian 12's ``user-mode-linux`` package (``/usr/bin/linux.uml``).
* ``7``:   Debian sid's ``user-mode-linux`` (7.x, has TLS 1.3 rekey), downloaded with a
  private apt configuration and cached under ``${XDG_CACHE_HOME:-~/.cache}/ktls/kernels``.

Usage::

    python tools/testkernel.py provision [--kernel 6.1|7|all] [--refresh]
    python tools/testkernel.py list
    python tools/testkernel.py run --kernel 6.1|7 [--mem 1G] [--timeout S] [-v] -- CMD ARGS...

``run`` exits with CMD's exit status, 124 on timeout, 125 when the kernel failed (did not
boot, or ended without reporting a status).  The command's stdout and stderr reach the
host's stdout and stderr; kernel messages go to a log file that is only shown on failure.

From Python: ``run_in_kernel("7", ["python", "-m", "pytest"]) -> int``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

KERNELS = ("6.1", "7")

SYSTEM_UML = Path("/usr/bin/linux.uml")
SYSTEM_UML_MODULES = Path("/usr/lib/uml/modules")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_DEBIAN_URI = "http://deb.debian.org/debian"

# Modules loaded before the command runs.  Names differ between kernels (7.x dropped
# ghash-generic, chacha_generic and poly1305_generic in favour of library code, and has
# aes built in), so each is tried and missing ones are skipped.
MODULES = (
    "tls",
    "gcm",
    "ghash-generic",
    "ctr",
    "ccm",
    "chacha20poly1305",
    "chacha_generic",
    "chacha",
    "poly1305_generic",
    "poly1305",
    "aes_generic",
    "aes",
    "sm4_generic",
    "sm4",
    "sm4-generic",
    "aria_generic",
    "aria",
    "af_alg",
    "algif_aead",
)

# Packages the guest's init script and the provisioning need, per kernel.
COMMON_PACKAGES = ("kmod", "iproute2")
KERNEL_PACKAGES = {"6.1": ("user-mode-linux",), "7": ("patchelf",)}

EXIT_TIMEOUT = 124  # like coreutils' timeout(1)
EXIT_KERNEL_FAILED = 125

# Caller environment variables not passed to the guest command: they describe the host
# session (terminal, agents, runtime dirs) or point at host paths the guest hides.
ENV_DROP = frozenset(
    {
        "_",
        "COLUMNS",
        "DBUS_SESSION_BUS_ADDRESS",
        "DISPLAY",
        "GPG_AGENT_INFO",
        "HOSTNAME",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "LINES",
        "LISTEN_FDNAMES",
        "LISTEN_FDS",
        "LISTEN_PID",
        "MAIL",
        "NOTIFY_SOCKET",
        "OLDPWD",
        "SHLVL",
        "SSH_AGENT_PID",
        "SSH_AUTH_SOCK",
        "SSH_CLIENT",
        "SSH_CONNECTION",
        "SSH_TTY",
        "STY",
        "TEMP",
        "TERMCAP",
        "TMP",
        "TMPDIR",  # the guest has its own tmpfs on /tmp
        "TMUX",
        "TMUX_PANE",
        "WAYLAND_DISPLAY",
        "WINDOWID",
        "XAUTHORITY",
        "XDG_RUNTIME_DIR",  # /run is a fresh tmpfs in the guest
    }
)

# Guest directories that get a fresh tmpfs; host paths below them are hidden in the guest
# unless mounted again from the host (see _exposures).
GUEST_TMPFS = ("/run", "/tmp")


class TestKernelError(Exception):
    """A kernel is missing or could not be provisioned or started."""


def _log(message: str) -> None:
    print(f"testkernel: {message}", file=sys.stderr, flush=True)


def _say(message: str) -> None:
    print(message, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).absolute() / "ktls"


def _sid_dir() -> Path:
    return cache_dir() / "kernels" / "sid"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on *path* (serialises concurrent provisioning)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # "6.1" or "7"
    binary: Path  # the linux.uml to execute
    modules: Path  # folder holding <version>/modules.dep etc.
    version: str  # uname -r inside the guest


def kernel_version(binary: Path) -> str:
    """``uname -r`` of a UML binary (``linux.uml --version`` prints just that)."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestKernelError(f"{binary} does not run: {exc}") from exc
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version or len(version.split()) != 1:
        detail = (proc.stderr or proc.stdout).strip()
        raise TestKernelError(f"{binary} --version failed ({proc.returncode}): {detail}")
    return version


def _check_modules(kernel: Kernel) -> Kernel:
    if not (kernel.modules / kernel.version / "modules.dep").is_file():
        raise TestKernelError(f"no modules for {kernel.version} in {kernel.modules}")
    return kernel


def find_kernel(name: str) -> Kernel:
    """The provisioned kernel *name*; raises TestKernelError if it is not ready."""
    hint = f"run: python tools/testkernel.py provision --kernel {name}"
    if name == "6.1":
        if not SYSTEM_UML.is_file():
            raise TestKernelError(f"{SYSTEM_UML} is missing; {hint}")
        version = kernel_version(SYSTEM_UML)
        return _check_modules(Kernel(name, SYSTEM_UML, SYSTEM_UML_MODULES, version))
    if name == "7":
        current = _sid_dir() / "current"
        binary = current / "linux.uml"
        if not (current / "kernel.json").is_file() or not binary.is_file():
            raise TestKernelError(f"kernel 7 is not provisioned; {hint}")
        version = kernel_version(binary)
        modules = current / "root" / "usr" / "lib" / "uml" / "modules"
        return _check_modules(Kernel(name, binary.absolute(), modules.absolute(), version))
    raise TestKernelError(f"unknown kernel {name!r} (known: {', '.join(KERNELS)})")


# ---------------------------------------------------------------------- provisioning


def _root_command(argv: Sequence[str]) -> list[str]:
    """*argv* run as root: directly, or through passwordless sudo (CI runners)."""
    if os.geteuid() == 0:
        return list(argv)
    if shutil.which("sudo"):
        return ["sudo", "-n", *argv]
    raise TestKernelError(f"need root to run: {shlex.join(argv)}")


def _run(
    argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> None:
    _say(f"+ {shlex.join(argv)}")
    proc = subprocess.run(list(argv), cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        raise TestKernelError(f"command failed ({proc.returncode}): {shlex.join(argv)}")


def _missing_packages(packages: Sequence[str]) -> list[str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    installed = set()
    for line in proc.stdout.splitlines():
        name, _, status = line.partition(" ")
        if status == "installed":
            installed.add(name.split(":")[0])
    return [package for package in packages if package not in installed]


def ensure_packages(packages: Sequence[str]) -> None:
    """Install the Debian *packages* that are missing (apt-get update only if needed)."""
    missing = _missing_packages(packages)
    if not missing:
        _say(f"packages present: {' '.join(packages)}")
        return
    _say(f"installing: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
    _run(_root_command([*apt, "update"]), env=env)
    _run(_root_command([*apt, "install", "-y", "--no-install-recommends", *missing]), env=env)
    still = _missing_packages(missing)
    if still:
        raise TestKernelError(f"packages still missing after apt-get install: {still}")


def provision_system_kernel() -> Kernel:
    """Kernel "6.1": the distribution's user-mode-linux package."""
    ensure_packages([*COMMON_PACKAGES, *KERNEL_PACKAGES["6.1"]])
    return find_kernel("6.1")


@dataclasses.dataclass(frozen=True)
class AptSource:
    uri: str
    signed_by: str | None  # keyring path, or an inline key block (deb822 multi-line)


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    """Parse deb822 text; continuation lines keep their leading space (inline keys)."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, key = {}, ""
        elif line[0] in " \t" and key:
            fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return stanzas


def _is_debian_archive(uri: str, suites: Sequence[str]) -> bool:
    return bool(re.search(r"/debian/?$", uri)) and not any("security" in s for s in suites)


def debian_source() -> AptSource:
    """The URI and keyring of the machine's Debian archive entry (for a sid entry).

    Copying the machine's own entry keeps whatever mirror (or proxy rewrite) it uses.
    """
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("types", "").split():
                continue
            suites = stanza.get("suites", "").split()
            for uri in stanza.get("uris", "").split():
                if _is_debian_archive(uri, suites):
                    return AptSource(uri, stanza.get("signed-by"))
    one_line = [Path("/etc/apt/sources.list"), *sorted(sources_dir.glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            match = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", raw)
            if match and _is_debian_archive(match[2], [match[3]]):
                options = dict(
                    item.split("=", 1) for item in (match[1] or "").split() if "=" in item
                )
                return AptSource(match[2], options.get("signed-by"))
    return AptSource(DEFAULT_DEBIAN_URI, None)


def _sid_sources(source: AptSource) -> str:
    signed_by = source.signed_by
    if signed_by is None and DEBIAN_KEYRING.is_file():
        signed_by = str(DEBIAN_KEYRING)
    lines = ["Types: deb", f"URIs: {source.uri}", "Suites: sid", "Components: main"]
    if signed_by:  # a keyring path, or an inline key on continuation lines
        lines.append(f"Signed-By:{'' if signed_by.startswith(chr(10)) else ' '}{signed_by}")
    return "\n".join(lines) + "\n"


def _private_apt_options(state: Path) -> list[str]:
    """apt-get options that read sources from, and keep all state in, *state*.

    A private apt root: the system's sources, lists and package cache stay untouched (no
    sid entry is ever visible to the system's apt), while /etc/apt/apt.conf.d (proxies,
    mirrors) still applies.
    """
    options = {
        "Dir::Etc::SourceList": "/dev/null",
        "Dir::Etc::SourceParts": str(state / "sources.list.d"),
        "Dir::Etc::Preferences": "/dev/null",
        "Dir::Etc::PreferencesParts": str(state / "preferences.d"),
        "Dir::State::Lists": str(state / "lists"),
        "Dir::Cache": str(state / "cache"),
        "Acquire::Languages": "none",
    }
    if os.geteuid() == 0:
        # apt drops to the _apt user to download, which cannot enter ~root/.cache.
        options["APT::Sandbox::User"] = "root"
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _deb_field(deb: Path, field: str) -> str:
    proc = subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _build_sid_kernel(target: Path, uml_deb: Path, libc_deb: Path) -> None:
    """Unpack the sid debs into *target* and make a runnable, patched linux.uml."""
    if target.exists():
        shutil.rmtree(target)
    root = target / "root"
    root.mkdir(parents=True)
    for deb in (uml_deb, libc_deb):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    loaders = sorted(root.glob("usr/lib/*/ld-linux*.so.*"))
    if not loaders:
        raise TestKernelError(f"no ld-linux loader in {libc_deb.name}")
    loader = loaders[0].absolute()
    libdir = loader.parent
    # sid's linux.uml needs a newer glibc than the host has.  Starting it as
    # `sid-ld.so linux.uml` does not work: UML re-executes /proc/self/exe (the loader)
    # early on.  So give a copy the sid loader as ELF interpreter and the sid libc
    # directory as DT_RPATH (--force-rpath: unlike RUNPATH it wins over LD_LIBRARY_PATH).
    binary = target / "linux.uml"
    shutil.copy2(root / "usr" / "bin" / "linux.uml", binary)
    _run(
        [
            "patchelf",
            "--set-interpreter",
            str(loader),
            "--force-rpath",
            "--set-rpath",
            str(libdir),
            str(binary),
        ]
    )
    version = kernel_version(binary)
    info = {
        "user-mode-linux": _deb_field(uml_deb, "Version"),
        "libc6": _deb_field(libc_deb, "Version"),
        "version": version,
    }
    _check_modules(Kernel("7", binary, root / "usr" / "lib" / "uml" / "modules", version))
    # Written last: its presence marks the directory complete.
    (target / "kernel.json").write_text(json.dumps(info, indent=2) + "\n")


def provision_sid_kernel(*, refresh: bool = False) -> Kernel:
    """Kernel "7": Debian sid's user-mode-linux, fetched once and cached."""
    ensure_packages([*COMMON_PACKAGES, *KERNEL_PACKAGES["7"]])
    if not DEBIAN_KEYRING.is_file() and debian_source().signed_by is None:
        ensure_packages(["debian-archive-keyring"])
    sid = _sid_dir()
    current = sid / "current"
    with _locked(sid / ".lock"):
        if not refresh and (current / "kernel.json").is_file():
            kernel = find_kernel("7")
            _say(f"kernel 7 cached: {kernel.version} in {current.resolve()}")
            return kernel
        work = sid / ".work"
        if work.exists():
            shutil.rmtree(work)
        state, debs = work / "apt", work / "debs"
        for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True)
        debs.mkdir()
        source = debian_source()
        (state / "sources.list.d" / "sid.sources").write_text(_sid_sources(source))
        _say(f"fetching user-mode-linux and libc6 from sid ({source.uri}), apt state in {state}")
        apt = ["apt-get", "-q", *_private_apt_options(state)]
        _run([*apt, "update"])
        # No version pin: sid moves, and old versions vanish from the mirrors.
        _run([*apt, "download", "user-mode-linux", "libc6"], cwd=debs)
        uml_deb = next(debs.glob("user-mode-linux_*.deb"))
        libc_deb = next(debs.glob("libc6_*.deb"))
        name = _safe_name(
            f"{_deb_field(uml_deb, 'Version')}_libc6-{_deb_field(libc_deb, 'Version')}"
        )
        target = sid / name
        if (target / "kernel.json").is_file():
            _say(f"already unpacked: {target}")
        else:
            _build_sid_kernel(target, uml_deb, libc_deb)
        # Switch atomically, so a concurrent `run` sees either the old or the new kernel.
        link = sid / ".current.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        link.replace(current)
        shutil.rmtree(work)
        for old in sid.iterdir():
            if old.is_dir() and not old.is_symlink() and old.name not in (name, ".work"):
                _say(f"removing old kernel {old}")
                shutil.rmtree(old)
        kernel = find_kernel("7")
        _say(f"kernel 7 ready: {kernel.version} in {target}")
    return kernel


def provision(name: str, *, refresh: bool = False) -> Kernel:
    if name == "6.1":
        kernel = provision_system_kernel()
        _say(f"kernel 6.1 ready: {kernel.version} ({kernel.binary})")
        return kernel
    if name == "7":
        return provision_sid_kernel(refresh=refresh)
    raise TestKernelError(f"unknown kernel {name!r}")


# ------------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunReport:
    status: int  # the command's exit status, or EXIT_TIMEOUT / EXIT_KERNEL_FAILED
    kernel: Kernel
    modules: list[str]  # names from MODULES loaded in (or built into) the kernel
    proc_modules: list[str]  # /proc/modules after loading them
    init_seconds: float | None  # from starting linux.uml to init running
    boot_seconds: float | None  # from starting linux.uml to the command starting
    total_seconds: float
    kernel_problems: list[str]  # BUG/WARNING/Oops lines from the kernel log


def _parse_mem(mem: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", mem.strip().upper())
    if not match:
        raise TestKernelError(f"bad --mem {mem!r} (examples: 512M, 1G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match[2]]
    return int(match[1]) * scale


def _exposures(paths: Sequence[str]) -> list[str]:
    """Those of *paths* that the guest's tmpfs mounts would hide, minus nested ones."""
    hidden = sorted(
        {
            os.path.normpath(path)
            for path in paths
            if any(path == top or path.startswith(top + "/") for top in GUEST_TMPFS)
        }
    )
    kept: list[str] = []
    for path in hidden:
        if not any(path.startswith(parent + "/") for parent in kept):
            kept.append(path)
    return kept


def _guest_env(env: Mapping[str, str], *, cwd: str, tty: bool) -> dict[str, str]:
    guest = {key: value for key, value in env.items() if key and key not in ENV_DROP}
    guest.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    guest.setdefault("HOME", str(Path.home()))
    guest["LANG"] = "C.UTF-8"
    guest["PWD"] = cwd
    # The command writes to a guest tty either way (line-buffered, live output); only
    # promise a capable terminal when the host side is one.
    if not tty:
        guest["TERM"] = "dumb"
        guest.pop("COLORTERM", None)
    return guest


def _init_script(
    *,
    run_dir: Path,
    cwd: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    exposed: Sequence[str],
    tty_size: os.terminal_size | None,
    load_modules: bool = True,
) -> str:
    q = shlex.quote
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"
    # Size of the guest ttys: the host terminal's, else 80x24 (not 0x0, which confuses
    # programs that ask).
    columns, lines = (tty_size.columns, tty_size.lines) if tty_size else (80, 24)
    stty_size = f" cols {columns} rows {lines}"
    expose = "".join(
        f"mkdir -p {q(path)} && mount -t hostfs -o {q(path)} hostfs {q(path)}\n" for path in exposed
    )
    command = " ".join(
        [
            "/usr/bin/env",
            "-i",
            "--",
            *(q(f"{key}={value}") for key, value in sorted(env.items())),
            *(q(arg) for arg in argv),
        ]
    )
    modules = (
        'echo "$RUN/modprobe" >/proc/sys/kernel/modprobe\n'
        f'"$RUN/modprobe" -a -q {" ".join(MODULES)}\n'
        if load_modules
        # --no-modules: a kernel whose TLS ULP is missing, and cannot be autoloaded.
        else "echo /bin/false >/proc/sys/kernel/modprobe\n"
    )
    return f"""#!/bin/sh
# Generated by tools/testkernel.py: PID 1 of a User-Mode Linux guest, for one run.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
RUN={q(str(run_dir))}
date +%s.%N >"$RUN/t_init"

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The kernel normally mounts devtmpfs on /dev itself; without it /dev would be the host's
# /dev seen through hostfs.
if ! grep -q '^[^ ]* /dev devtmpfs ' /proc/mounts ||
    ! {{ : >/dev/null && head -c 1 /dev/urandom >/dev/null; }} 2>/dev/null; then
    mount -t devtmpfs devtmpfs /dev
fi
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
# Host directories the tmpfs mounts just hid (run directory, cwd, ...): mount them again.
{expose}
{q(ip)} link set lo up
echo ktls-uml >/proc/sys/kernel/hostname

# The host has no /lib/modules/$(uname -r) for this kernel: $RUN/modprobe runs
# `modprobe -d $RUN/modroot`, whose lib/modules links to the kernel's own tree.  Making it
# the kernel's modprobe helper also lets the kernel autoload modules (crypto algorithms,
# TCP ULPs, socket families) on demand.  Preload the usual ones with a single modprobe
# (each start costs ~0.1 s under UML); -a goes on past names this kernel lacks.
{modules}cat /proc/modules >"$RUN/proc-modules"

# tty1 and tty2 are wired to host pipes (con1=/con2= on the kernel command line) that the
# host copies to its stdout and stderr: the command's output stays apart from kernel
# messages on the console (tty0).  Raw mode: no \\n -> \\r\\n translation.
stty -F /dev/tty1 raw -echo{stty_size}
stty -F /dev/tty2 raw -echo{stty_size}
date +%s.%N >"$RUN/t_cmd"
(
    cd {q(cwd)} || exit {EXIT_KERNEL_FAILED}
    exec {command}
) </dev/null >/dev/tty1 2>/dev/tty2
echo $? >"$RUN/status"
# stty sets attributes with TCSADRAIN: it returns once the ttys' output has been sent.
stty -F /dev/tty1 raw
stty -F /dev/tty2 raw
sync
# `poweroff -f` halts at once; plain `poweroff` would ask an init system that is not
# running, and letting PID 1 exit makes the kernel panic.
poweroff -f
echo o >/proc/sysrq-trigger
sleep 10
"""


def _modprobe() -> str:
    modprobe = shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if modprobe is None:
        raise TestKernelError("modprobe is missing (package kmod); run provision")
    return modprobe


def _present_modules(kernel: Kernel, modroot: Path, proc_modules: Sequence[str]) -> list[str]:
    """Names from MODULES that are loaded in, or built into, the guest kernel.

    A name may be an alias ("aes" -> aes_generic): resolve each one with the host's
    modprobe against the kernel's module tree (-S: for that kernel version).
    """
    listing = _read_text(kernel.modules / kernel.version / "modules.builtin") or ""
    builtin = {
        Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
        for line in listing.splitlines()
        if line.strip()
    }
    present = {name.replace("-", "_") for name in proc_modules} | builtin
    found: list[str] = []
    for name in MODULES:
        proc = subprocess.run(
            [_modprobe(), "-d", str(modroot), "-S", kernel.version, "-R", name],
            capture_output=True,
            text=True,
            check=False,
        )
        resolved = [module.replace("-", "_") for module in proc.stdout.split()]
        if resolved and all(module in present for module in resolved):
            found.append(name)
    return found


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def _read_time(path: Path) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _is_tty(stream: IO[bytes]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _uml_environment(mem_bytes: int, run_dir: Path) -> dict[str, str]:
    """Host environment for the linux.uml process itself."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TMPDIR", "TMP", "TEMP", "LD_PRELOAD", "LD_LIBRARY_PATH")
    }
    # UML backs guest memory with a file in $TMPDIR, else /dev/shm.  Keep it on /dev/shm
    # (RAM), unless that is too small (Docker's default is 64 MiB): then the guest would
    # die of SIGBUS when its memory fills, so use the run directory instead.
    try:
        shm = os.statvfs("/dev/shm")
        shm_free = shm.f_bavail * shm.f_frsize
    except OSError:
        shm_free = 0
    if shm_free < mem_bytes:
        env["TMPDIR"] = str(run_dir)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill linux.uml and the host processes it made (it leads its own session)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_kernel(
    kernel: str | Kernel,
    argv: Sequence[str],
    *,
    mem: str = "1G",
    timeout: float = 1800,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    expose: Sequence[str | os.PathLike[str]] = (),
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    keep: bool = False,
    verbose: bool = False,
    load_modules: bool = True,
) -> RunReport:
    """Boot *kernel*, run *argv* inside it, and report.

    The guest sees the host's root filesystem read-write.  *cwd* (default: the current
    directory) and *env* (default: os.environ, minus host-session variables) are the
    command's; *expose* lists extra host paths under /tmp or /run the command needs
    (those are otherwise hidden by the guest's own tmpfs).  The command's stdout and
    stderr are copied live to *stdout* and *stderr* (default: this process's).
    """
    if not argv:
        raise TestKernelError("no command given")
    kern = kernel if isinstance(kernel, Kernel) else find_kernel(kernel)
    out_sink = stdout if stdout is not None else sys.stdout.buffer
    err_sink = stderr if stderr is not None else sys.stderr.buffer
    sys.stdout.flush()
    sys.stderr.flush()
    workdir = os.path.abspath(cwd if cwd is not None else os.getcwd())
    mem_bytes = _parse_mem(mem)
    modprobe = _modprobe()

    # The run directory must be on the host filesystem, which the guest sees through
    # hostfs: the guest writes its results there.  (Not /tmp: the guest has its own.)
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    if re.search(r"[\s\"']", str(run_dir)):
        shutil.rmtree(run_dir)
        raise TestKernelError(f"cache path must not contain spaces or quotes: {run_dir}")
    try:
        modroot = run_dir / "modroot" / "lib"
        modroot.mkdir(parents=True)
        (modroot / "modules").symlink_to(kern.modules)
        wrapper = run_dir / "modprobe"
        wrapper.write_text(
            f"#!/bin/sh\nexec {shlex.quote(modprobe)} -d "
            f'{shlex.quote(str(run_dir / "modroot"))} "$@"\n'
        )
        wrapper.chmod(0o755)

        caller_env = os.environ if env is None else env
        out_tty = _is_tty(out_sink)
        tty_size = None
        if out_tty:
            try:
                tty_size = os.get_terminal_size(out_sink.fileno())
            except (OSError, ValueError):
                tty_size = None
        guest_env = _guest_env(caller_env, cwd=workdir, tty=out_tty)
        exposed = _exposures(
            [str(run_dir), workdir, *(os.path.abspath(p) for p in expose)]
            + ([guest_env["VIRTUAL_ENV"]] if guest_env.get("VIRTUAL_ENV") else [])
        )
        init = run_dir / "init.sh"
        init.write_text(
            _init_script(
                run_dir=run_dir,
                cwd=workdir,
                argv=argv,
                env=guest_env,
                exposed=exposed,
                tty_size=tty_size,
                load_modules=load_modules,
            ),
            errors="surrogateescape",
        )
        init.chmod(0o755)

        return _boot(
            kern,
            run_dir=run_dir,
            mem=mem,
            mem_bytes=mem_bytes,
            timeout=timeout,
            out_sink=out_sink,
            err_sink=err_sink,
            verbose=verbose,
            load_modules=load_modules,
        )
    finally:
        if keep:
            _log(f"kept run directory {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def _boot(
    kernel: Kernel,
    *,
    run_dir: Path,
    mem: str,
    mem_bytes: int,
    timeout: float,
    out_sink: IO[bytes],
    err_sink: IO[bytes],
    verbose: bool,
    load_modules: bool = True,
) -> RunReport:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    console = run_dir / "console.log"
    cmdline = [
        str(kernel.binary),
        f"mem={mem}",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        f"init={run_dir / 'init.sh'}",
        # Kernel console (tty0) -> console.log; the command's stdout/stderr -> pipes.
        "con=null",
        "con0=null,fd:1",
        f"con1=null,fd:{out_w}",
        f"con2=null,fd:{err_w}",
        "ssl=null",
        # UML keeps a pid file and a control socket in <uml_dir>/<umid>/ (default
        # ~/.uml/): a directory of our own lets runs proceed side by side.
        f"uml_dir={run_dir}",
        "umid=uml",
    ]
    timed_out = False
    started = time.time()
    deadline = time.monotonic() + timeout
    with console.open("wb") as log:
        try:
            proc = subprocess.Popen(
                cmdline,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(out_w, err_w),
                env=_uml_environment(mem_bytes, run_dir),
                # Own session and process group: kill the lot on timeout, and keep the
                # terminal's Ctrl-C for this process, which then kills the kernel.
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise TestKernelError(f"cannot start {kernel.binary}: {exc}") from exc
        os.close(out_w)
        os.close(err_w)
        selector = selectors.DefaultSelector()
        selector.register(out_r, selectors.EVENT_READ, out_sink)
        selector.register(err_r, selectors.EVENT_READ, err_sink)
        try:
            exited_at: float | None = None
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 5:
                    break  # something still holds a pipe open; the kernel is gone
                for key, _ in selector.select(timeout=min(deadline - now, 0.5)):
                    data = os.read(key.fd, 65536)
                    sink: IO[bytes] = key.data
                    if data:
                        sink.write(data)
                        sink.flush()
                    else:
                        selector.unregister(key.fd)
            if timed_out:
                _kill_group(proc)
            else:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        finally:
            _kill_group(proc)  # no-op unless interrupted (KeyboardInterrupt, SystemExit)
            for fd in (out_r, err_r):
                os.close(fd)
            selector.close()
    total = time.time() - started

    def since_start(name: str) -> float | None:
        stamp = _read_time(run_dir / name)
        return None if stamp is None else stamp - started

    log_text = _read_text(console) or ""
    problems = [
        line
        for line in log_text.splitlines()
        if re.search(r"\b(BUG|WARNING|Oops|Kernel panic|general protection)\b", line)
    ]
    proc_modules = [
        line.split()[0]
        for line in (_read_text(run_dir / "proc-modules") or "").splitlines()
        if line.strip()
    ]
    report = RunReport(
        status=EXIT_KERNEL_FAILED,
        kernel=kernel,
        modules=_present_modules(kernel, run_dir / "modroot", proc_modules) if proc_modules else [],
        proc_modules=proc_modules,
        init_seconds=since_start("t_init"),
        boot_seconds=since_start("t_cmd"),
        total_seconds=total,
        kernel_problems=problems,
    )
    status_text = (_read_text(run_dir / "status") or "").strip()
    if timed_out:
        _log(f"timeout: killed kernel {kernel.name} after {timeout:g} s")
        report.status = EXIT_TIMEOUT
    elif status_text.isdigit():
        report.status = int(status_text)
    else:
        what = "before starting the command" if report.boot_seconds is None else "early"
        _log(
            f"kernel {kernel.name} ({kernel.version}) ended {what}, without the command's "
            f"exit status (linux.uml exit {proc.returncode}); end of its log:"
        )
        for line in log_text.splitlines()[-30:]:
            print(f"    {line}", file=sys.stderr)
    if load_modules and "tls" not in report.modules and report.boot_seconds is not None:
        _log(f"warning: module tls did not load in kernel {kernel.name}")
    for line in problems:
        _log(f"kernel log: {line}")
    if verbose:
        init = "?" if report.init_seconds is None else f"{report.init_seconds:.2f} s"
        boot = "?" if report.boot_seconds is None else f"{report.boot_seconds:.2f} s"
        _log(
            f"kernel {kernel.name} {kernel.version}; modules: {' '.join(report.modules)}; "
            f"kernel-to-init {init}; boot-to-command {boot}; total {total:.2f} s; "
            f"status {report.status}"
        )
    return report


def run_in_kernel(
    kernel: str,
    argv: list[str],
    *,
    mem: str = "1G",
    timeout: float = 1800,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    expose: Sequence[str | os.PathLike[str]] = (),
    verbose: bool = False,
) -> int:
    """Run *argv* in UML kernel *kernel* ("6.1" or "7"); return its exit status.

    124 means timeout, 125 that the kernel failed; see run_kernel for the details.
    """
    return run_kernel(
        kernel,
        argv,
        mem=mem,
        timeout=timeout,
        cwd=cwd,
        env=env,
        expose=expose,
        verbose=verbose,
    ).status


# ------------------------------------------------------------------------------- CLI


def list_kernels() -> int:
    for name in KERNELS:
        try:
            kernel = find_kernel(name)
        except TestKernelError as exc:
            print(f"{name:<4} {'-':<10} {exc}")
        else:
            print(f"{name:<4} {kernel.version:<10} {kernel.binary}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testkernel.py",
        description="Provision and run User-Mode Linux kernels with kernel TLS.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provision", help="install or download the kernels")
    prov.add_argument("--kernel", choices=[*KERNELS, "all"], default="all")
    prov.add_argument("--refresh", action="store_true", help="download the newest sid kernel again")
    commands.add_parser("list", help="show the kernels and their versions")
    run = commands.add_parser("run", help="run a command in a kernel: run --kernel K -- CMD")
    run.add_argument("--kernel", choices=KERNELS, required=True)
    run.add_argument("--mem", default="1G", help="guest memory (default 1G)")
    run.add_argument(
        "--timeout", type=float, default=1800, help="seconds before the kernel is killed"
    )
    run.add_argument(
        "--expose",
        action="append",
        default=[],
        metavar="PATH",
        help="host path under /tmp or /run to keep visible in the guest (repeatable)",
    )
    run.add_argument("--keep", action="store_true", help="keep the run directory")
    run.add_argument(
        "--no-modules",
        action="store_true",
        help="load no kernel module (no TLS ULP: for testing what happens without it)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="report modules and boot time")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if args is None else args)
    command: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    options = _parser().parse_args(arguments)
    if options.command != "run" and command:
        _parser().error("a command after -- only goes with run")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        if options.command == "provision":
            names = KERNELS if options.kernel == "all" else (options.kernel,)
            for name in names:
                provision(name, refresh=options.refresh)
            return 0
        if options.command == "list":
            return list_kernels()
        if not command:
            _parser().error("run needs a command: run --kernel K -- CMD [ARGS...]")
        for attempt in range(2):
            report = run_kernel(
                options.kernel,
                command,
                mem=options.mem,
                timeout=options.timeout,
                expose=options.expose,
                keep=options.keep,
                load_modules=not options.no_modules,
                verbose=options.verbose,
            )
            panicked = report.status == EXIT_KERNEL_FAILED and any(
                "Kernel panic" in line for line in report.kernel_problems
            )
            if not panicked or attempt:
                break
            # UML 7.2 panicked in its own memory management (munmap, exec: "Bad page
            # map") when uvloop spawned processes (the tests no longer let it); should a
            # panic still come, it is a fault in the test kernel, not a test result: said
            # loudly, and the command runs once more.
            _log(f"the UML kernel itself panicked ({report.kernel_problems[-1]}); running again")
        return report.status
    except TestKernelError as exc:
        _log(f"error: {exc}")
        return EXIT_KERNEL_FAILED
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
