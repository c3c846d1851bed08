"""Wall time and peak memory of a block of code, without psutil.

Peak memory is the largest resident set size seen while the block runs, minus the RSS just
before it: a sampling thread reads ``/proc/self/statm`` every few milliseconds (Linux). Where
``/proc`` is missing it falls back to ``resource.getrusage`` (process-lifetime peak, so the
delta is 0 unless the block sets a new record). Tensor allocations are invisible to
``tracemalloc``, hence RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """Resident set size of this process in bytes, or ``None`` without ``/proc``."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def max_rss() -> int:
    """Peak RSS of the process so far in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0
    """Peak RSS during the block minus the RSS before it."""
    method: str = "statm"


class measure:
    """``with measure() as m: ...`` then ``m.result.seconds`` and ``m.result.peak_bytes``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> measure:
        before = current_rss()
        if before is None:
            self.result.method = "ru_maxrss"
            self._before = max_rss()
        else:
            self._before = before
            self._peak = before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.result.seconds = time.perf_counter() - self._t0
        if self._thread is not None:
            rss = current_rss()
            if rss is not None:
                self._peak = max(self._peak, rss)
            self._stop.set()
            self._thread.join()
            self.result.peak_bytes = max(0, self._peak - self._before)
        else:
            self.result.peak_bytes = max(0, max_rss() - self._before)
