"""``python -m bench`` / ``make bench``: measure here and in a UML kernel, one table, one JSON."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import envinfo, registry, report, runner
from bench.model import MIB, Config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_JSON = RESULTS / "latest.json"

# Sizes per environment, before any option: UML is ~10x slower, handshakes most of all.
HOST = Config(runs=5, bulk_bytes=64 * MIB, round_trips=2000, handshakes=500)
UML = Config(runs=5, bulk_bytes=64 * MIB, round_trips=1000, handshakes=150)
QUICK = Config(
    runs=1,
    bulk_bytes=2 * MIB,
    round_trips=50,
    handshakes=5,
    warmup_bulk_bytes=MIB,
    warmup_round_trips=10,
    warmup_handshakes=2,
)

_SIZE = re.compile(r"(\d+)\s*([KMG]?)(i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 64M, 512K, 1G)")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="ktls benchmarks: measured here and inside a UML test kernel, side by "
        "side; prints one table, writes one JSON file.  Not a test: nothing is asserted.",
    )
    p.add_argument("--runs", type=int, help="runs per environment (default 5; --quick: 1)")
    p.add_argument("--size", type=parse_size, help="bulk bytes per transfer (default 64M)")
    p.add_argument(
        "--round-trips", type=int, help="latency round trips (default 2000 host, 1000 UML)"
    )
    p.add_argument(
        "--handshakes", type=int, help="handshakes per path and run (default 500 host, 150 UML)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 1 run, no warm-up: proves the tool works (make test)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="suites/rows/paths to run, by name or glob, repeatable or comma-separated "
        "(e.g. core, core/bulk, 'core/*/threads', core/handshakes/server); see --list",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help="output file (default bench/results/latest.json)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--host-only", action="store_true", help="only where this command runs (no UML)"
    )
    where.add_argument("--kernel-only", action="store_true", help="only inside the UML kernel")
    p.add_argument(
        "--kernel", default="7", help="UML test kernel to run in (tools/testkernel.py; default 7)"
    )
    p.add_argument("--list", action="store_true", help="list suites, rows and paths, then exit")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # inner UML run
    return p


def config(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else UML if envinfo.inside_uml() else HOST
    given = {
        "runs": args.runs,
        "bulk_bytes": args.size,
        "round_trips": args.round_trips,
        "handshakes": args.handshakes,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def patterns(args: argparse.Namespace) -> list[str]:
    return [p for item in args.only for p in item.split(",") if p]


def measure_here(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    cfg = config(args)
    missing = envinfo.ktls_missing()
    env = envinfo.describe(missing)
    err.print(f"[bold]== {env['name']}[/]: {cfg}")
    suites: dict[str, Any] = {}
    for name in registry.SUITES:
        suite = registry.load(name)
        paths, rows = registry.select(suite, patterns(args))
        if not paths:
            continue
        result = runner.run(
            suite,
            paths,
            rows,
            cfg,
            kernel_missing=missing,
            warmup=not args.quick,
            progress=lambda line: err.print(f"[dim]{line}[/]"),
        )
        suites[name] = result.to_json()
    return {"environment": env, "config": dataclasses.asdict(cfg), "suites": suites}


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The options the inner (UML) run needs: only those the user gave."""
    out = ["--host-only", "--no-table"]
    for flag, value in (
        ("--runs", args.runs),
        ("--size", args.size),
        ("--round-trips", args.round_trips),
        ("--handshakes", args.handshakes),
    ):
        if value is not None:
            out += [flag, str(value)]
    out += ["--quick"] if args.quick else []
    out += [f"--only={p}" for p in patterns(args)]
    return out


def measure_in_uml(args: argparse.Namespace, err: Console) -> list[dict[str, Any]]:
    inner_json = RESULTS / f".uml-{args.kernel}.json"
    inner_json.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(ROOT / "tools" / "testkernel.py"),
        "run",
        "--kernel",
        args.kernel,
        "--timeout",
        "3600",
        "--",
        "env",
        f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
        sys.executable,
        "-m",
        "bench",
        *_passthrough(args),
        "--json",
        str(inner_json),
    ]
    err.print(f"[bold]== UML kernel {args.kernel}[/]: {' '.join(command[1:5])} ...")
    status = subprocess.run(command, cwd=ROOT, check=False).returncode
    if not inner_json.is_file():
        raise SystemExit(
            f"bench: the run inside UML {args.kernel} wrote no results (status {status})"
        )
    environments: list[dict[str, Any]] = json.loads(inner_json.read_text())["environments"]
    inner_json.unlink()
    return environments


def failures(envs: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{env['environment']['name']}: {suite}/{name}: {path['reason']}"
        for env in envs
        for suite, result in env["suites"].items()
        for name, path in result["paths"].items()
        if path["status"] == "failed"
    ]


def list_all(console: Console) -> None:
    for name in registry.SUITES:
        suite = registry.load(name)
        console.print(f"[bold]{name}[/]: {suite.description}")
        for row in suite.rows:
            console.print(f"  row  {name}/{row.name}: {row.candidate} ÷ {row.baseline}")
        for path in suite.paths:
            kernel = " (needs kTLS)" if path.needs_kernel else ""
            console.print(f"  path {name}/{path.name} [{path.unit}]{kernel}: {path.label}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Wide enough for two environments side by side, also when piped to a file.
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    if args.list:
        list_all(console)
        return 0
    envs: list[dict[str, Any]] = []
    if not args.kernel_only:
        envs.append(measure_here(args, err))
    if not args.host_only:
        envs += measure_in_uml(args, err)
    document = {
        "tool": "ktls bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "notes": report.notes(envs),
        "environments": envs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    if not args.no_table:
        report.render(envs, console)
        console.print(f"JSON: {args.json}")
    failed = failures(envs)
    for line in failed:
        err.print(f"[red]FAILED[/] {line}")
    return 1 if failed else 0
