"""CPU time of the calling thread, split into user and system time (getrusage
RUSAGE_THREAD): each end measures itself, so threads and processes count alike."""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class Cpu:
    user: float
    sys: float

    @property
    def total(self) -> float:
        return self.user + self.sys

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.sys - other.sys)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.sys + other.sys)

    def as_dict(self) -> dict[str, float]:
        # What crosses the pipe from a child process (JSON).
        return {"user": self.user, "sys": self.sys}


def thread_cpu() -> Cpu:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return Cpu(usage.ru_utime, usage.ru_stime)
