"""Pictures of a run: RSS over time with block boundaries, and the rank of every module by block.

matplotlib is an optional extra (`pip install streamrom[plots]`): without it these functions
return None and nothing else changes. Each PNG is written to a temporary name, then renamed.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

MODULE_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: no pictures (pip install matplotlib)")
        return None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save(figure, path: Path) -> Path:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png")
    os.replace(temporary, path)
    return path


def rss_timeline_png(samples: Sequence[Sequence[float]], marks: Sequence[Sequence], path: Path,
                     title: str = "", estimate_bytes: int | None = None) -> Path | None:
    """RSS (MiB) against seconds; `marks` are (seconds, label) lines such as block starts."""
    plt = _pyplot()
    if plt is None or not samples:
        return None
    figure, axes = plt.subplots(figsize=(9, 3.6))
    try:
        axes.plot([s for s, _ in samples], [r / 2**20 for _, r in samples], lw=1.0, color="tab:blue", label="RSS")
        peak = max(r for _, r in samples) / 2**20
        axes.axhline(peak, color="tab:blue", ls=":", lw=0.8)
        axes.text(0, peak, f" peak {peak:.0f} MiB", va="bottom", fontsize=8, color="tab:blue")
        if estimate_bytes:
            axes.axhline(estimate_bytes / 2**20, color="tab:red", ls="--", lw=0.8, label="estimate")
        for i, (seconds, label) in enumerate(marks):
            axes.axvline(seconds, color="0.6", lw=0.6)
            if len(marks) <= 16 or i % max(1, len(marks) // 16) == 0:
                axes.text(seconds, 0, f" {label}", rotation=90, va="bottom", fontsize=7, color="0.35")
        axes.set_xlabel("seconds")
        axes.set_ylabel("resident memory (MiB)")
        axes.set_ylim(bottom=0)
        axes.set_title(title, fontsize=10)
        axes.legend(loc="upper right", fontsize=8)
        return _save(figure, path)
    finally:
        plt.close(figure)


def rank_grid(ranks: dict[str, int | None], num_layers: int) -> list[list[int | None]]:
    """ranks["model.layers.<i>.<module>"] as a module x block grid (None: dense)."""
    grid: list[list[int | None]] = [[None] * num_layers for _ in MODULE_ORDER]
    for name, rank in ranks.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match and match.group(2) in MODULE_ORDER and int(match.group(1)) < num_layers:
            grid[MODULE_ORDER.index(match.group(2))][int(match.group(1))] = rank
    return grid


def rank_heatmap_png(ranks: dict[str, int | None], full_ranks: dict[str, int], num_layers: int, path: Path,
                     title: str = "") -> Path | None:
    """Each module's kept rank as a fraction of its full rank, by block; dense cells are marked."""
    plt = _pyplot()
    if plt is None or num_layers == 0:
        return None
    grid = rank_grid(ranks, num_layers)
    fractions = [[1.0 if r is None else r / full_ranks[module] for r in row]
                 for module, row in zip(MODULE_ORDER, grid)]
    figure, axes = plt.subplots(figsize=(max(6, 0.32 * num_layers + 2.5), 3.2))
    try:
        image = axes.imshow(fractions, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        for m, row in enumerate(grid):
            for b, rank in enumerate(row):
                text = "D" if rank is None else str(rank)
                axes.text(b, m, text, ha="center", va="center", fontsize=5 if num_layers > 16 else 7,
                          color="black" if rank is None or fractions[m][b] > 0.6 else "white")
        axes.set_yticks(range(len(MODULE_ORDER)), [m.split(".")[1] for m in MODULE_ORDER], fontsize=8)
        axes.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=6)
        axes.set_xlabel("block (D: dense)")
        axes.set_title(title or "kept rank / full rank", fontsize=10)
        figure.colorbar(image, ax=axes, fraction=0.025, label="rank / min(out, in)")
        return _save(figure, path)
    finally:
        plt.close(figure)


def report_pictures(report: dict, full_ranks: dict[str, int], folder: Path, stem: str) -> list[str]:
    """The compress report's pictures beside it: <stem>-rss.png and <stem>-ranks.png."""
    memory = report.get("memory", {})
    written = [
        rss_timeline_png(memory.get("timeline", []), memory.get("marks", []), Path(folder) / f"{stem}-rss.png",
                         title=f"streamrom compress {Path(report['source']).name}: resident memory",
                         estimate_bytes=memory.get("estimated_peak_bytes")),
        rank_heatmap_png(report.get("ranks", {}), full_ranks, report.get("num_layers", 0),
                         Path(folder) / f"{stem}-ranks.png",
                         title=f"kept rank by module and block ({report.get('method')})"),
    ]
    return [str(path) for path in written if path is not None]
