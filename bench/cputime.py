"""CPU time of a callable, measured the way floor.c times itself."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(run: Callable[[], object], repeat: int) -> float:
    """Median process CPU (user + system) of ``repeat`` calls of ``run``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return round(statistics.median(times) * 1000, 3)
