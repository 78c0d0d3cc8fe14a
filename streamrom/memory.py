"""Measured memory: resident set size sampled in a thread, plus the operating system's own peak."""
from __future__ import annotations

import resource
import sys
import threading
import time

import psutil


def os_peak_rss_bytes() -> int:
    """The kernel's record of this process's peak RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RSSMonitor:
    """Samples RSS every `interval` seconds while running; keeps the peak and a (time, bytes) timeline."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._start = 0.0

    def __enter__(self) -> "RSSMonitor":
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def mark(self, label: str) -> None:
        """Note an event (e.g. a block boundary) on the timeline."""
        self.marks.append((time.perf_counter() - self._start, label))

    def _sample(self) -> None:
        self.samples.append((time.perf_counter() - self._start, self._process.memory_info().rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_bytes(self) -> int:
        return max(rss for _, rss in self.samples) if self.samples else 0
