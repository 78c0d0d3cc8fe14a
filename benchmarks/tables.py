"""The result pages' tables, written from the benchmark JSON, never by hand.

A page in docs/results/ marks each generated table with a line `<!-- generated: NAME -->` above it and
`<!-- end of generated table -->` below; `python -m benchmarks.tables` writes every such table again
from benchmarks/results/, and tests/test_docs.py fails where a committed page differs from what this
writes. The text around a table is the page's own.

    python -m benchmarks.tables
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAGES = REPO / "docs" / "results"
START = "<!-- generated: {name} -->"
END = "<!-- end of generated table -->"
MIB = 2 ** 20


def _setting(row: dict) -> str:
    """The command's options that make the row, as a user would type them."""
    method, allocate = row.get("method", "rom"), row.get("allocate", "uniform")
    parts = [f"`--method {method}`" if method != "rom" else "`rom`", allocate]
    if method in ("structured", "mixed"):
        parts.append(f"`--neuron-selection {row.get('neuron_selection', 'obs')}`")
    if row.get("anchor"):
        parts.append(f"`--anchor {row['anchor']:g}`")
    if row.get("pass1_tokens"):
        parts.append(f"`--pass1-tokens {row['pass1_tokens']}`")
    return ", ".join(parts)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} s"


def scale_table() -> str:
    """docs/results/scale.md: every row of memory_7b.json and memory_13b.json (benchmarks/memory_profile.py)."""
    lines = ["| shape | setting | blocks | tokens | wall | forward | backward | statistics | eigen | read + write "
             "| peak RSS (sampled / OS) | estimate | measured / estimate | projected | commit, GEMM peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in ("7b", "13b"):
        found = json.loads((RESULTS / f"memory_{shape}.json").read_text())
        for row in found["rows"]:
            stages = row["stage_seconds"]
            forward = _seconds(stages.get("forward"))
            if stages.get("dense stream"):
                forward += f" (+ {stages['dense stream']:.0f} s dense stream)"
            projected = row.get("projected_seconds", {}).get("total")
            peak = row["peak_rss_bytes"] / MIB
            lines.append(
                f"| {shape.upper()} | {_setting(row)} | {row['depth']} | {row['calibration_tokens']:,} "
                f"| {row['wall_seconds']:.0f} s | {forward} | {_seconds(stages.get('backward'))} "
                f"| {_seconds(stages.get('statistics'))} | {_seconds(stages.get('eigen'))} "
                f"| {stages.get('read', 0) + stages.get('write', 0):.0f} s "
                f"| {peak:.0f} / {row['os_peak_rss_bytes'] / MIB:.0f} MiB | {row['estimated_peak_bytes'] / MIB:.0f} MiB "
                f"| {peak / (row['estimated_peak_bytes'] / MIB):.2f} | {_seconds(projected)} "
                f"| {row.get('commit', '–')}, {row['gemm_peak_gflops']:.0f} GFLOP/s |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"scale": scale_table}


def render(text: str) -> str:
    """`text` with every generated table written again."""
    def again(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise KeyError(f"no generated table named {name!r} (benchmarks/tables.py: TABLES)")
        return f"{START.format(name=name)}\n{TABLES[name]()}\n{END}"

    pattern = re.escape(START).replace(re.escape("{name}"), r"([\w-]+)") + r"\n.*?\n" + re.escape(END)
    return re.sub(pattern, again, text, flags=re.S)


def generated_names(text: str) -> list[str]:
    return re.findall(re.escape(START).replace(re.escape("{name}"), r"([\w-]+)"), text)


def main() -> None:
    for page in sorted(PAGES.glob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            page.write_text(new)
            print(f"written {page.relative_to(REPO)} ({', '.join(generated_names(text))})")


if __name__ == "__main__":
    main()
