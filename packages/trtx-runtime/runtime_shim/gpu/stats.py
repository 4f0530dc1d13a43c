"""Seconds spent by step in an upload, for benchmarks: pass a Stats to Uploader; without one nothing is timed.

The hot path calls ``timed(stats, name)``: with ``stats=None`` that is a shared do-nothing context, so a load reads
no clock for numbers that only bench/bench_upload.py prints.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager

_UNTIMED: AbstractContextManager[None] = contextlib.nullcontext()


class _Timer:
    """One step's timer, reused for every block of that step (a Stats is used from one thread)."""

    __slots__ = ("_before", "_less", "_name", "_seconds", "_t0")

    def __init__(self, seconds: dict[str, float], name: str, less: str | None) -> None:
        self._seconds, self._name, self._less = seconds, name, less
        self._t0 = self._before = 0.0

    def __enter__(self) -> None:
        if self._less is not None:
            self._before = self._seconds.get(self._less, 0.0)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._t0
        if self._less is not None:
            elapsed -= self._seconds.get(self._less, 0.0) - self._before
        self._seconds[self._name] = self._seconds.get(self._name, 0.0) + elapsed


class Stats:
    """Seconds by step name, summed over calls (host wall time on the one thread that runs the upload's loop)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._timers: dict[tuple[str, str | None], _Timer] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str, *, less: str | None = None) -> AbstractContextManager[None]:
        """A context adding its block's time to ``name``; ``less``: minus what the block added to that other step
        meanwhile (work run inside the block that has its own line)."""
        timer = self._timers.get((name, less))
        if timer is None:
            timer = self._timers[name, less] = _Timer(self.seconds, name, less)
        return timer

    def clear(self) -> None:
        self.seconds.clear()

    def items(self) -> list[tuple[str, float]]:
        """(step, seconds), sorted by step name."""
        return sorted(self.seconds.items())


def timed(stats: Stats | None, name: str, *, less: str | None = None) -> AbstractContextManager[None]:
    """``stats.timed(name)``, or a context that does nothing when ``stats`` is None."""
    return _UNTIMED if stats is None else stats.timed(name, less=less)
