"""What suites declare (paths, rows) and what the runner records (samples)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.cpu import Cpu

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    """Sizes for one environment; every path reads what it needs."""

    runs: int = 5
    bulk_bytes: int = 64 * MIB
    buffer_size: int = 256 * 1024
    round_trips: int = 2000
    message_size: int = 1024
    handshakes: int = 200
    # The warm-up measures each path once at these (smaller) sizes and throws it away.
    warmup_bulk_bytes: int = 4 * MIB
    warmup_round_trips: int = 100
    warmup_handshakes: int = 10

    def warmup(self) -> Config:
        return Config(
            runs=1,
            bulk_bytes=self.warmup_bulk_bytes,
            buffer_size=self.buffer_size,
            round_trips=self.warmup_round_trips,
            message_size=self.message_size,
            handshakes=self.warmup_handshakes,
            warmup_bulk_bytes=self.warmup_bulk_bytes,
            warmup_round_trips=self.warmup_round_trips,
            warmup_handshakes=self.warmup_handshakes,
        )


@dataclass(frozen=True)
class Sample:
    """One measurement of one path: ``value`` is in the path's unit, higher is better."""

    value: float
    seconds: float
    # CPU time of both ends over the measured part, or None if not measured.
    cpu: Cpu | None = None
    nbytes: int | None = None  # bytes moved, for CPU seconds per GiB
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_seconds(self) -> float | None:
        return None if self.cpu is None else self.cpu.total

    @property
    def cpu_per_gib(self) -> float | None:
        if self.cpu_seconds is None or not self.nbytes:
            return None
        return self.cpu_seconds * GIB / self.nbytes


@dataclass(frozen=True)
class Path:
    """Something measured once per run; ``name`` is unique within its suite."""

    name: str
    label: str
    unit: str  # "MB/s", "round trips/s", "handshakes/s"
    measure: Callable[[Config], Sample]
    needs_kernel: bool = False  # needs kTLS here; otherwise reported as "no kTLS here"


@dataclass(frozen=True)
class Row:
    """``candidate`` / ``baseline``, both paths measured in the same run: the headline."""

    name: str
    label: str
    candidate: str
    baseline: str


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    paths: tuple[Path, ...]
    rows: tuple[Row, ...]
