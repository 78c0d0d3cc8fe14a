"""How the command line shows a run: logging handlers for the console and the log file.

Library code only logs. A record that carries `extra={"progress": (done, total, task)}` is a step
of a long task (a block of compress, eval or import-gguf): on a terminal it redraws one progress
line with a bar, the ETA and the current RSS; elsewhere (a pipe, a nightly job's log) it is one
plain line with the same facts. `--log-file` gets every record, with timestamps, whatever --quiet.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TextIO

import psutil

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressTracker:
    """ETA per task, from the steps done in this process (a resumed run starts its clock anew)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started: dict[str, tuple[float, int]] = {}

    def describe(self, done: int, total: int, task: str) -> str:
        now = self.clock()
        start, first = self.started.setdefault(task, (now, done))
        rss = psutil.Process().memory_info().rss / 2**20
        if done > first and done < total:
            eta = f"ETA {format_seconds((now - start) / (done - first) * (total - done))}"
        elif done >= total:
            eta = f"done in {format_seconds(now - start)}"
        else:
            eta = "ETA --"
        return f"{task} {done}/{total}  {eta}  RSS {rss:.0f} MiB"


class ConsoleHandler(logging.Handler):
    """Progress records as a redrawn bar on a terminal, as plain lines elsewhere."""

    def __init__(self, stream: TextIO | None = None, tracker: ProgressTracker | None = None, width: int = 24):
        super().__init__()
        self._stream = stream  # None: whatever sys.stderr is when a record comes (tests swap it)
        self.tracker = tracker or ProgressTracker()
        self.width = width
        self.bar_shown = False

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def _is_tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            progress = getattr(record, "progress", None)
            tty = self._is_tty()
            if progress is not None:
                done, total, task = progress
                facts = self.tracker.describe(done, total, task)
                if tty:
                    filled = int(self.width * done / max(total, 1))
                    bar = "#" * filled + "-" * (self.width - filled)
                    self.stream.write(f"\r\033[K[{bar}] {facts}")
                    self.bar_shown = done < total
                    if not self.bar_shown:
                        self.stream.write("\n")
                else:
                    self.stream.write(f"{self.format(record)}  ({facts})\n")
            else:
                if self.bar_shown and tty:
                    self.stream.write("\r\033[K")
                    self.bar_shown = False
                self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def configure(quiet: bool, log_file: Path | None = None, stream: TextIO | None = None) -> list[logging.Handler]:
    """Console (INFO, or WARNING with quiet) and optional file (INFO) handlers on the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_streamrom", False):
            root.removeHandler(handler)
            handler.close()
    console = ConsoleHandler(stream)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter(FORMAT))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(_FileFormatter(FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._streamrom = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handlers


class _FileFormatter(logging.Formatter):
    """Progress records in the log file carry their step count, ETA-free (the file is for later)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        progress = getattr(record, "progress", None)
        if progress is not None:
            rss = psutil.Process().memory_info().rss / 2**20
            text += f"  ({progress[2]} {progress[0]}/{progress[1]}, RSS {rss:.0f} MiB)"
        return text
