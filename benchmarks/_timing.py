"""Wall-clock timing shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import time
from typing import Callable


def repeat_times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times
