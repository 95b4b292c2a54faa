"""The suites the tool knows: name -> module exposing ``SUITE`` (a bench.model.Suite).

A new benchmark (asyncio, `ktls serve` against nginx, AF_ALG/KCM designs...) adds a
module under bench/ and one line here; runner, table and JSON come for free.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Sequence

from bench.model import Path, Row, Suite

SUITES = {
    "core": "bench.core",
    "asyncio": "bench.aio",
    "serve": "bench.serve",
    "wrap": "bench.wrap",
}


def load(name: str) -> Suite:
    suite: Suite = importlib.import_module(SUITES[name]).SUITE
    return suite


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # A pattern names a suite, a group, a row or a path, by glob or by prefix.
    return any(
        fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip("/") + "/") for p in patterns
    )


def select(suite: Suite, patterns: Sequence[str]) -> tuple[tuple[Path, ...], tuple[Row, ...]]:
    """The rows and paths ``--only`` asks for (all when no pattern); rows bring their paths."""
    if not patterns:
        return suite.paths, suite.rows
    rows = tuple(r for r in suite.rows if _matches(f"{suite.name}/{r.name}", patterns))
    wanted = {p for r in rows for p in (r.candidate, r.baseline)}
    paths = tuple(
        p for p in suite.paths if p.name in wanted or _matches(f"{suite.name}/{p.name}", patterns)
    )
    return paths, rows
