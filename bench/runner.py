"""Runs paths side by side: a warm-up each, then N runs, each run measuring every
selected path once (the order rotates from run to run, so no path always goes first
or last); rows get one ratio per run from two samples of that same run."""

from __future__ import annotations

import statistics
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.model import Config, Path, Row, Sample, Suite

Progress = Callable[[str], None]


@dataclass
class PathResult:
    path: Path
    status: str = "ok"  # "ok", "skipped" (cannot run here) or "failed"
    reason: str | None = None
    samples: list[Sample | None] = field(default_factory=list)  # one per run


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def path_summary(result: PathResult) -> dict[str, Any]:
    samples = [s for s in result.samples if s is not None]
    cpu = [s.cpu_per_gib for s in samples if s.cpu_per_gib is not None]
    return {
        "value": _spread([s.value for s in samples]),
        "cpu_s_per_gib": _spread(cpu),
        "cpu_seconds": _spread([s.cpu_seconds for s in samples if s.cpu_seconds is not None]),
    }


def row_ratios(row: Row, results: dict[str, PathResult]) -> list[float | None]:
    cand, base = results[row.candidate].samples, results[row.baseline].samples
    # A skipped path has no samples at all: then there is no ratio either.
    return [c.value / b.value if c and b else None for c, b in zip(cand, base, strict=False)]


def why_not(row: Row, results: dict[str, PathResult]) -> str | None:
    """Why a row has no ratio (the first reason of its two paths), or None."""
    for name in (row.candidate, row.baseline):
        if results[name].status != "ok":
            return results[name].reason
    return None


@dataclass
class SuiteRun:
    suite: Suite
    paths: dict[str, PathResult]
    rows: tuple[Row, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.suite.description,
            "paths": {name: _path_json(r) for name, r in self.paths.items()},
            "rows": {row.name: self._row_json(row) for row in self.rows},
        }

    def _row_json(self, row: Row) -> dict[str, Any]:
        ratios = row_ratios(row, self.paths)
        return {
            "label": row.label,
            "candidate": row.candidate,
            "baseline": row.baseline,
            "ratios": ratios,
            "summary": _spread([r for r in ratios if r is not None]),
            "missing": why_not(row, self.paths),
        }


def _path_json(result: PathResult) -> dict[str, Any]:
    return {
        "label": result.path.label,
        "unit": result.path.unit,
        "status": result.status,
        "reason": result.reason,
        "runs": [None if s is None else _sample_json(s) for s in result.samples],
        "summary": path_summary(result),
    }


def _sample_json(sample: Sample) -> dict[str, Any]:
    return {
        **asdict(sample),
        "cpu_seconds": sample.cpu_seconds,
        "cpu_s_per_gib": sample.cpu_per_gib,
    }


def _attempt(result: PathResult, cfg: Config) -> Sample | None:
    try:
        return result.path.measure(cfg)
    except Exception as exc:  # a failing path is reported, and the others still run
        result.status = "failed"
        result.reason = f"{type(exc).__name__}: {exc}"
        result.samples.append(None)
        traceback.print_exc()
        return None


def run(
    suite: Suite,
    paths: Sequence[Path],
    rows: tuple[Row, ...],
    cfg: Config,
    *,
    kernel_missing: str | None,
    warmup: bool,
    progress: Progress,
) -> SuiteRun:
    results = {p.name: PathResult(p) for p in paths}
    for result in results.values():
        if result.path.needs_kernel and kernel_missing is not None:
            result.status, result.reason = "skipped", "no kTLS here"
    live = [r for r in results.values() if r.status == "ok"]
    if warmup:
        for result in live:
            progress(f"warm-up {suite.name}/{result.path.name}")
            _attempt(result, cfg.warmup())
            result.samples.clear()
    for run_index in range(cfg.runs):
        shift = run_index % max(len(live), 1)
        for result in live[shift:] + live[:shift]:
            if result.status != "ok":
                result.samples.append(None)
                continue
            sample = _attempt(result, cfg)
            if sample is not None:
                result.samples.append(sample)
                progress(
                    f"run {run_index + 1}/{cfg.runs} {suite.name}/{result.path.name}: "
                    f"{sample.value:,.1f} {result.path.unit}"
                )
    return SuiteRun(suite, results, rows)
