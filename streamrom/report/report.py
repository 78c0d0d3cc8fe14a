"""Run reports: time per stage, measured memory, and the JSON file every run leaves behind."""
from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import torch

from ..storage.checkpoint import write_atomic
from .memory import RSSMonitor, os_peak_rss_bytes


class StageTimer:
    """Wall seconds accumulated per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def machine() -> dict[str, Any]:
    return {
        "cpu_count": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def memory_summary(monitor: RSSMonitor, timeline_points: int = 2000) -> dict[str, Any]:
    """Peak RSS (sampled and the OS's), and the timeline with its marks for plotting."""
    return {
        "peak_rss_bytes": monitor.peak_bytes,
        "os_peak_rss_bytes": os_peak_rss_bytes(),
        "rss_samples": len(monitor.samples),
        "timeline": downsample(monitor.samples, timeline_points),
        "marks": [[round(t, 2), label] for t, label in monitor.marks],
    }


def downsample(samples: list[tuple[float, int]], points: int) -> list[list[float]]:
    """At most `points` (seconds, rss) pairs; each keeps its bucket's largest RSS, so peaks survive."""
    step = max(1, -(-len(samples) // points))
    kept = []
    for start in range(0, len(samples), step):
        bucket = samples[start:start + step]
        seconds, rss = max(bucket, key=lambda sample: sample[1])
        kept.append([round(seconds, 2), rss])
    return kept


@dataclass
class Report:
    """What a `compress` or `eval` run did; `to_dict` is what its JSON file holds."""

    command: str
    source: str
    output: str | None = None
    model_type: str = ""
    num_layers: int = 0
    method: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, int | None] = field(default_factory=dict)
    parameters_before: int | None = None
    parameters_after: int | None = None
    perplexity: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # compress: the stages' seconds projected before the work started (compression/time_estimate.py), and the probe
    projected_seconds: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)  # compress: work files beside the output, by kind
    pictures: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine)

    @property
    def parameter_ratio(self) -> float | None:
        if self.parameters_before and self.parameters_after is not None:
            return self.parameters_after / self.parameters_before
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameter_ratio"] = self.parameter_ratio
        return data

    def write(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())
