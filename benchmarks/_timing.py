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


def start(threads: int) -> None:
    """Set the torch threads, silence warnings and print the machine line every benchmark begins with."""
    import platform
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')} UTC")
