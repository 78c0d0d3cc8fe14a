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
    if row.get("refine_steps"):
        parts.append(f"`--refine-steps {row['refine_steps']}`")
    return ", ".join(parts)


def _commit(row: dict) -> str:
    """The commit of the code that measured a row, short; '–' where the run did not record it (its
    header then names the commit that landed the row, benchmarks/common.py)."""
    run = row["run"]
    return "–" if "commit" in run.get("reconstructed", {}) else run["commit"][:7]


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} s"


def scale_table() -> str:
    """docs/results/scale.md: every row of memory_7b.json and memory_13b.json (benchmarks/scale/memory_profile.py)."""
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
                f"| {_commit(row)}, {row['gemm_peak_gflops']:.0f} GFLOP/s |")
    return "\n".join(lines)


def thread_scaling_table() -> str:
    """docs/results/scale.md: each step of the recommended setting at 7B shape at 1 and 2 threads
    (stage_profile_7b.json's rows labelled threads-1 and threads-2, run as a pair), its speed-up, and
    what Amdahl's law with the serial share that speed-up implies makes of it at 16 threads."""
    from benchmarks.scale.stage_profile import PHASES, SETUP
    rows = {row["label"]: row for row in json.loads((RESULTS / "stage_profile_7b.json").read_text())["rows"]
            if row.get("label") in ("threads-1", "threads-2")}
    if len(rows) < 2:
        return ""
    one, two = rows["threads-1"], rows["threads-2"]
    depth = one["depth"]

    def seconds(row: dict) -> dict[tuple[str, str], tuple[float, bool]]:
        return {(step["phase"], step["step"]): (step["seconds"] / (1 if step["once"] else depth), step["once"])
                for step in row["steps"]}

    at_one, at_two = seconds(one), seconds(two)
    order = [*(label for label, _ in PHASES), SETUP]
    keys = sorted(set(at_one) | set(at_two), key=lambda key: (at_one.get(key, at_two.get(key))[1],
                                                               order.index(key[0]), -at_one.get(key, (0.0,))[0]))
    lines = ["| phase | step | 1 thread | 2 threads | speed-up | 16 threads (Amdahl) |", "|---|---|---|---|---|---|"]
    totals = {"block": [0.0, 0.0, 0.0], "once": [0.0, 0.0, 0.0]}
    for key in keys:
        t1, once = at_one.get(key, (0.0, False))
        t2 = at_two.get(key, (0.0, once))[0]
        if t1 < 0.05 and t2 < 0.05:
            continue
        speedup = t1 / t2 if t2 > 0 else 1.0
        serial = min(1.0, max(0.0, 2 / speedup - 1))  # 1/(f + (1-f)/2) = speed-up
        t16 = t1 * (serial + (1 - serial) / 16)
        part = totals["once" if once else "block"]
        part[0], part[1], part[2] = part[0] + t1, part[1] + t2, part[2] + t16
        lines.append(f"| {key[0]} | {key[1]}{' (once)' if once else ''} | {t1:.1f} s | {t2:.1f} s | {speedup:.2f}× "
                     f"| {t16:.1f} s |")
    block, once = totals["block"], totals["once"]
    lines.append("| all | a block: the rows not marked once | " + " | ".join(f"**{value:.0f} s**" for value in block[:2])
                 + f" | {block[0] / block[1]:.2f}× | **{block[2]:.0f} s** |")
    lines.append("| all | 32 blocks and the steps done once | " + " | ".join(
        f"**{(32 * b + o) / 60:.0f} min**" for b, o in zip(block[:2], once[:2]))
                 + f" | | **{(32 * block[2] + once[2]) / 60:.0f} min** |")
    lines.append(f"| | wall time of the profiled runs ({depth} blocks) | {one['wall_seconds']:.0f} s "
                 f"| {two['wall_seconds']:.0f} s | {one['wall_seconds'] / two['wall_seconds']:.2f}× | |")
    return "\n".join(lines)


def refinement_scale_table() -> str:
    """docs/results/scale.md: block refinement at 7B shape (memory_7b.json's mixed pass1 rows, each
    --refine-steps beside the row without it): the refine stage a block, projected and measured, its
    cost a step (between the two largest step counts), what it would add to a 32-block model, and memory."""
    rows = [row for row in json.loads((RESULTS / "memory_7b.json").read_text())["rows"]
            if row.get("method") == "mixed" and row.get("neuron_selection") == "pass1"
            and not row.get("pass1_tokens") and not row.get("anchor") and row["depth"] == 2]  # the pairs' depth
    rows.sort(key=lambda row: row.get("refine_steps", 0))
    per_block = {row.get("refine_steps", 0): row["stage_seconds"].get("refine", 0.0) / row["depth"] for row in rows}
    steps = sorted(per_block)
    per_step = ((per_block[steps[-1]] - per_block[steps[-2]]) / (steps[-1] - steps[-2])
                if len(steps) >= 3 else None)  # two refined rows: the slope between them
    lines = ["| `--refine-steps` | wall (2 blocks) | refine a block: measured / projected | refine, 32 blocks "
             "| peak RSS (sampled / OS) | estimate | measured / estimate | commit, GEMM peak |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        count = row.get("refine_steps", 0)
        projected = row.get("projected_seconds", {}).get("refine")
        measured = per_block[count]
        cells = ("–", "–") if not count else (
            f"{measured:.0f} s / " + ("–" if projected is None else f"{projected / row['depth']:.0f} s"),
            f"{32 * measured / 60:.0f} min")
        peak = row["peak_rss_bytes"] / MIB
        lines.append(f"| {count} | {row['wall_seconds']:.0f} s | {cells[0]} | {cells[1]} "
                     f"| {peak:.0f} / {row['os_peak_rss_bytes'] / MIB:.0f} MiB | {row['estimated_peak_bytes'] / MIB:.0f} MiB "
                     f"| {peak / (row['estimated_peak_bytes'] / MIB):.2f} | {_commit(row)}, "
                     f"{row['gemm_peak_gflops']:.0f} GFLOP/s |")
    if per_step is not None:
        lines.append(f"| a step more | | {per_step:.1f} s a block | {32 * per_step / 60:.1f} min | | | | |")
    return "\n".join(lines)


def profile_table() -> str:
    """docs/results/scale.md: the seconds of each step of the algorithm, a block's or once per model,
    one column per profiled setting (benchmarks/scale/stage_profile.py, py-spy samples of the main thread)."""
    from benchmarks.scale.stage_profile import PHASES, SETUP, STEPS
    found = [row for row in json.loads((RESULTS / "stage_profile_7b.json").read_text())["rows"]
             if not row.get("label", "").startswith("threads-")]  # thread_scaling_table's pair
    described = {step: what for step, what, _ in STEPS}
    columns = [f"`{row['setting']}`, {row['depth']} blocks, {row['calibration_tokens']:,} tokens, "
               f"{row['threads']} threads, {_commit(row)}" + (f" ({row['label']})" if row.get("label") else "")
               for row in found]
    tables = [{(step["phase"], step["step"]): step["seconds"] / (1 if step["once"] else row["depth"])
               for step in row["steps"]} for row in found]
    once = {(step["phase"], step["step"]): step["once"] for row in found for step in row["steps"]}
    keys = sorted(once, key=lambda key: (once[key], [*(label for label, _ in PHASES), SETUP].index(key[0]),
                                         -max(table.get(key, 0.0) for table in tables)))
    lines = ["| phase | step | " + " | ".join(columns) + " | what it is |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for phase, step in keys:
        cells = " | ".join(f"{table.get((phase, step), 0.0):.1f} s" for table in tables)
        what = described.get(step, "the rest: setup, reading the config, small steps")
        lines.append(f"| {phase} | {step}{' (once)' if once[(phase, step)] else ''} | {cells} | {what} |")
    lines.append("| all | a block: the rows not marked once | " + " | ".join(
        f"**{sum(seconds for key, seconds in table.items() if not once[key]):.0f} s**" for table in tables) + " | |")
    lines.append("| all | wall time | " + " | ".join(f"**{row['wall_seconds']:.0f} s**" for row in found)
                 + " | the whole run, profiled |")
    return "\n".join(lines)


def gemma3_grid_table() -> str:
    """docs/results/real-model.md: Gemma 3 270M's grid (benchmarks/quality/gemma3_grid.py), each
    checkout's rows beside its own dense model, perplexity per held-out genre."""
    found = json.loads((RESULTS / "gemma3_grid.json").read_text())
    genres = list(found["evaluation_texts"])
    rows = found["rows"]
    lines = ["| code | model | parameters | " + " | ".join(genres) + " | compress time |",
             "|---|---|---|" + "---|" * len(genres) + "---|"]
    for row in rows:
        dense = next(other for other in rows if other["key"] == f"{row['code']}/dense")
        if row is dense:
            cells = [f"{row['perplexity'][genre]:.2f}" for genre in genres]
            model, size, seconds = "dense", "1.000", ""
        else:
            cells = _genre_cells(row["perplexity"], dense["perplexity"], genres)
            model = f"`--method {row['method']}`, {row['reduction']} % smaller"
            size = f"{row['parameter_ratio']:.3f}"
            seconds = _compress_time(row)
        lines.append(f"| {row['code']} ({row['commit']}) | {model} | {size} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def _with_dense(path: Path) -> tuple[list[str], dict[str, float], dict[str, dict]]:
    """A quality results file whose rows include one keyed "dense": its genres, the dense row's
    perplexity by genre, and the other rows by key."""
    found = json.loads(path.read_text())
    rows = {row["key"]: row for row in found["rows"]}
    return list(found["evaluation_texts"]), rows.pop("dense")["perplexity"], rows


def _genre_cells(perplexity: dict[str, float], dense: dict[str, float], genres: list[str]) -> list[str]:
    """Each genre's perplexity with its change against the dense model's."""
    return [f"{perplexity[genre]:.2f} ({_change(perplexity[genre], dense[genre])})" for genre in genres]


def embedding_rank_table(path: Path = RESULTS / "embedding_rank.json") -> str:
    """docs/results/real-model.md: Gemma 3 270M with a low-rank tied embedding
    (benchmarks/quality/embedding_rank.py, which prints it too), perplexity per held-out genre beside the
    dense model's."""
    genres, dense, rows = _with_dense(path)
    lines = ["| embedding | parameters | " + " | ".join(genres) + " |",
             "|---|---|" + "---|" * len(genres),
             "| dense | 1.000 | " + " | ".join(f"{dense[genre]:.2f}" for genre in genres) + " |"]
    for key, row in rows.items():
        ratio = "–" if row["parameter_ratio"] is None else f"{row['parameter_ratio']:.3f}"
        lines.append(f"| {key} | {ratio} | " + " | ".join(_genre_cells(row["perplexity"], dense, genres)) + " |")
    return "\n".join(lines)


def calibration_volume_table() -> str:
    """docs/results/real-model.md: the mixed setting on SmolLM2 against calibration volume
    (benchmarks/quality/calibration_volume.py), perplexity per held-out genre beside the dense model's."""
    genres, dense, rows = _with_dense(RESULTS / "calibration_volume.json")
    lines = ["| reduction | calibration | tokens | " + " | ".join(genres) + " | compress time |",
             "|---|---|---|" + "---|" * len(genres) + "---|",
             "| dense | | | " + " | ".join(f"{dense[genre]:.2f}" for genre in genres) + " | |"]
    for row in sorted(rows.values(), key=lambda row: (row["reduction"], row["tokens"], row["seqlen"])):
        cells = _genre_cells(row["perplexity"], dense, genres)
        seconds = _compress_time(row)
        lines.append(f"| {row['reduction']} % | {row['sequences']} × {row['seqlen']} | {row['tokens']:,} | "
                     + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def _lever_table(lever: str, setting: Callable[[dict], str], plain_name: str, versus: str) -> str:
    """docs/results/real-model.md: the mixed setting on SmolLM2 with one lever (benchmarks/quality/levers.py)
    against the spectrum plan alone; plain cells it has not measured itself come from
    calibration_volume.json's 32 x 512 rows (the same command without the lever)."""
    found = json.loads((RESULTS / "levers.json").read_text())
    genres = list(found["evaluation_texts"])
    volume = {row["key"]: row for row in json.loads((RESULTS / "calibration_volume.json").read_text())["rows"]}
    dense = volume["dense"]["perplexity"]
    rows = {(row["reduction"], row["key"]): row for row in found["rows"] if row["lever"] == lever}
    plain = {reduction: volume[f"mixed/{reduction}/32x512"] for reduction, _ in rows
             if f"mixed/{reduction}/32x512" in volume}
    lines = ["| reduction | setting | " + " | ".join(genres) + " | compress time |",
             "|---|---|" + "---|" * len(genres) + "---|",
             "| dense | | " + " | ".join(f"{dense[genre]:.2f}" for genre in genres) + " | |"]
    for reduction in sorted({reduction for reduction, _ in rows}):
        measured = [row for (at, _), row in sorted(rows.items()) if at == reduction]
        for row in ([plain[reduction]] if reduction in plain else []) + measured:
            base = plain.get(reduction) if row is not plain.get(reduction) else None
            cells = [f"{row['perplexity'][genre]:.2f} ({_change(row['perplexity'][genre], dense[genre])}"
                     + (f"; {_change(row['perplexity'][genre], base['perplexity'][genre])} {versus})"
                        if base else ")") for genre in genres]
            seconds = _compress_time(row)
            shown = setting(row) if base or reduction not in plain else plain_name
            lines.append(f"| {reduction} % | {shown} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def refinement_table() -> str:
    """docs/results/real-model.md: block refinement (--refine-steps) on the mixed setting."""
    return _lever_table("refine", lambda row: f"`--refine-steps {row['refine_steps']} --refine-lr {row['refine_lr']:g}`",
                        "none", "against unrefined")


def bayes_mixed_table() -> str:
    """docs/results/real-model.md: the bayes search over the mixed plan (--allocate bayes)."""
    def setting(row: dict) -> str:
        shown = f"`--allocate bayes --trials {row['trials']}`"
        if "best_trial" in row:  # trial 0 is the spectrum plan itself
            seconds = row["trial_seconds"]
            shown += (f" (best: trial {row['best_trial']}" + (", the spectrum plan" if row["best_trial"] == 0 else "")
                      + f"; {sum(seconds) / len(seconds):.0f} s a trial)")
        return shown

    return _lever_table("bayes", setting, "`--allocate spectrum`", "against spectrum")


def anchor_levers_table() -> str:
    """docs/results/real-model.md: anchored fits (--anchor) on the mixed setting."""
    return _lever_table("anchor", lambda row: f"`--anchor {row['anchor']:g}`", "none", "against plain")


def combined_levers_table() -> str:
    """docs/results/real-model.md: more calibration tokens, anchored fits and block refinement at once,
    against today's cells (the recommended setting at 32 x 512 with no lever)."""
    return _lever_table("combined", lambda row: f"{row['sequences']} × {row['seqlen']}, `--anchor {row['anchor']:g}"
                        + (f" --refine-steps {row['refine_steps']} --refine-lr {row['refine_lr']:g}`"
                           if row["refine_steps"] else "` (no refinement)"),
                        "today: 32 × 512, no lever", "against today")


def first_use_table() -> str:
    """docs/results/real-model.md: issue 34's first-use protocol (benchmarks/speed/first_use_speed.py), each
    model's best round against the dense model's."""
    rows = json.loads((RESULTS / "first_use_speed.json").read_text())["rows"]
    dense = next(row for row in rows if row["label"] == "dense")
    lines = ["| model | prefill tok/s (× dense) | decode tok/s (× dense) |", "|---|---|---|"]
    for row in rows:
        found = re.fullmatch(r"([\w-]+?)-(\d+)(-padded)?", row["label"])
        name = "dense" if found is None else (f"{found.group(2)} % `{found.group(1)}`, "
                                              + ("padded" if found.group(3) else "narrowed attention"))
        cells = [f"{row[f'{phase}_tokens_per_second']:.{digits}f}" + (
            "" if row is dense else f" ({row[f'{phase}_tokens_per_second'] / dense[f'{phase}_tokens_per_second']:.2f} ×)")
            for phase, digits in (("prefill", 0), ("decode", 1))]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _quality() -> tuple[dict[str, float], list[int]]:
    """benchmarks/results/quality.json's perplexities by key (method/allocation/reduction) and its sizes."""
    rows = json.loads((RESULTS / "quality.json").read_text())["rows"]
    found = {row["key"]: row["perplexity"] for row in rows}
    return found, sorted({row["reduction"] for row in rows if row["reduction"]})


def _perplexity(value: float | None, best: float | None = None) -> str:
    if value is None:
        return ""
    text = f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"
    return f"**{text}**" if best is not None and round(value, 2) == round(best, 2) else text


def _compress_time(row: dict) -> str:
    """A compression's seconds for a results table: whether pass 1 is in them, and a row's note on how
    they were taken (`timing`, e.g. beside other work) where it has one."""
    return (f"{row['compress_seconds']:.0f} s" + (", pass 1 included" if row["includes_pass1"] else "")
            + (f" ({row['timing']})" if row.get("timing") else ""))


def _change(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f} %".replace("-", "−")


FACTORED = ("rom", "rom-centered", "svd")
ALLOCATIONS = ("uniform", "last-n", "spectrum", "bayes")


def factored_table() -> str:
    """docs/results/real-model.md: the factored methods at each whole-model size (benchmarks/quality/grid.py).
    A last-n cell not measured is the uniform plan (last-n factors every block below --ratio from 20 %
    on); svd has no spectrum or bayes cell (both price the directions ROM keeps)."""
    found, sizes = _quality()
    columns = [(method, allocation) for method in FACTORED for allocation in ALLOCATIONS
               if not (method == "svd" and allocation in ("spectrum", "bayes"))]
    header = ["whole-model reduction"]
    for method, allocation in columns:
        header.append(f"`{method}` {allocation}")
        if (method, allocation) == ("rom", "spectrum"):
            header.append("spectrum vs uniform")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        values = {column: found.get(f"{column[0]}/{column[1]}/{size}") for column in columns}
        best = min(v for v in values.values() if v is not None)
        cells = [f"{size} %"]
        for column in columns:
            value = values[column]
            cells.append("= uniform" if value is None and column[1] == "last-n" else _perplexity(value, best))
            if column == ("rom", "spectrum"):
                uniform = values[("rom", "uniform")]
                cells.append(_change(value, uniform) if value and uniform else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def structured_table() -> str:
    """docs/results/real-model.md: structured and mixed against the best factored cell of each size."""
    found, sizes = _quality()
    columns = [("structured", "uniform", "`structured` uniform"), ("structured", "spectrum", "`structured` spectrum"),
               ("mixed", "spectrum", "`mixed` spectrum, `--neuron-selection obs`"),
               ("mixed+pass1", "spectrum", "`mixed` spectrum, `pass1` (the default)")]
    leverage = ("structured+leverage", "spectrum", "`structured` spectrum, `--neuron-selection leverage`")
    header = ["whole-model reduction", "best factored cell", *(c[2] for c in columns), "mixed vs best factored",
              leverage[2]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        factored = [(found[key], method, allocation) for method in FACTORED for allocation in ALLOCATIONS
                    if (key := f"{method}/{allocation}/{size}") in found]
        best_factored, method, allocation = min(factored, key=lambda f: (f[0], ALLOCATIONS.index(f[2])))
        values = [found.get(f"{c[0]}/{c[1]}/{size}") for c in (*columns, leverage)]
        best = min(v for v in values if v is not None)
        default = values[3]
        versus = _change(default, best_factored) if default else ""
        cells = [f"{size} %", f"{best_factored:.2f} (`{method}` {allocation})",
                 *(_perplexity(v, best) for v in values[:4]), versus, _perplexity(values[4])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchored_table() -> str:
    """docs/results/real-model.md: plain against anchored fits, same ranks and widths (benchmarks/quality/anchored.py):
    rom-centered from anchored.json, structured (its unit refits anchored) from anchored_structured.json."""
    strengths = (0.25, 0.5, 1.0)
    sources = (("rom-centered", "anchored.json"), ("structured", "anchored_structured.json"))
    lines = ["| reduction | method (spectrum) | plain: ppl / KL / top-1 | "
             + " | ".join(f"anchor {strength:g}" for strength in strengths) + " |", "|---|---|---|---|---|---|"]
    for method, source in sources:
        rows = json.loads((RESULTS / source).read_text())["rows"]
        found = {(row["reduction"], row["anchor"]): row for row in rows
                 if row["method"] == method and row["key"].count("/") == 3}
        for size in sorted({size for size, _ in found}):
            plain = found[(size, 0.0)]
            anchored = {strength: found.get((size, strength)) for strength in strengths}
            best = min(row["perplexity"] for row in anchored.values() if row)

            def cell(row: dict | None) -> str:
                if row is None:
                    return ""
                text = f"{row['perplexity']:.2f} / {row['mean_kl']:.3f} / {100 * row['top1_agreement']:.1f} %"
                if row is plain:
                    return text
                text += f" ({_change(row['perplexity'], plain['perplexity'])})"
                return f"**{text}**" if row["perplexity"] == best else text

            lines.append(f"| {size} % | `{method}` | {cell(plain)} | "
                         + " | ".join(cell(anchored[strength]) for strength in strengths) + " |")
    return "\n".join(lines)


def _timed_model_perplexity(folder: str) -> float:
    """Perplexity of the model in `folder` (benchmarks/speed/inference.py times the quality grids' own outputs):
    from the grid that wrote it, by the folder's name."""
    name = Path(folder).name
    if name == "smollm2":  # the dense model
        return next(row["perplexity"] for row in json.loads((RESULTS / "quality.json").read_text())["rows"]
                    if row["key"] == "dense")
    source, stem = ("anchored.json", name.removeprefix("anchored-quality-")) if name.startswith("anchored-") \
        else ("quality.json", name.removeprefix("quality-"))
    for row in json.loads((RESULTS / source).read_text())["rows"]:
        if row["key"].replace("/", "-") == stem:  # the grids name a row's folder by its key
            return row["perplexity"]
    raise KeyError(f"no perplexity for {folder}")


def inference_table() -> str:
    """docs/results/real-model.md: speed and model RSS of the grids' models (benchmarks/speed/inference.py)."""
    found = json.loads((RESULTS / "inference.json").read_text())["rows"]
    by = {(row["label"], row["loader"], row["threads"]): row for row in found}
    labels = list(dict.fromkeys(row["label"] for row in found))
    lines = ["| model | perplexity (P&P) | transformers, 1 thread: prefill / decode tok/s | 2 threads | "
             "`streamrom.load` prefill tok/s, 1 / 2 threads | model RSS, transformers / `streamrom.load` |",
             "|---|---|---|---|---|---|"]
    for label in labels:
        kind, _, size = label.partition("-")
        name = "dense" if label == "dense" else f"{size} % " + ("factored" if kind == "factored" else f"`{kind}`")
        cells = [name, f"{_timed_model_perplexity(by[(label, 'transformers', 1)]['folder']):.2f}"]
        for threads in (1, 2):
            row, dense = by[(label, "transformers", threads)], by[("dense", "transformers", threads)]
            text = f"{row['prefill_tokens_per_second']:.0f} / {row['decode_tokens_per_second']:.1f}"
            if label != "dense":
                text += (f" ({row['prefill_tokens_per_second'] / dense['prefill_tokens_per_second']:.2f} / "
                         f"{row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f} ×)")
            cells.append(text)
        cells.append(" / ".join(f"{by[(label, 'streamrom', threads)]['prefill_tokens_per_second']:.0f}"
                                for threads in (1, 2)))
        cells.append(" / ".join(f"{(row['rss_steady_bytes'] - row['rss_before_load_bytes']) / MIB:.0f}"
                                for row in (by[(label, "transformers", 1)], by[(label, "streamrom", 1)])) + " MiB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def factored_speed_table() -> str:
    """docs/results/real-model.md: a factored linear's speed-up over the dense one, minimum / median over
    the shapes and token counts of each group, 1 · 2 threads (benchmarks/speed/factored_speed.py)."""
    import statistics

    rows = json.loads((RESULTS / "factored_speed.json").read_text())["rows"]
    groups = [(family, dtype) for family in ("7b", "smollm2") for dtype in ("float32", "bfloat16")]
    names = {"7b": "7B shapes", "smollm2": "135M shapes", "float32": "float32", "bfloat16": "bf16"}
    lines = ["| fraction kept | " + " | ".join(f"{names[family]}, {names[dtype]}, 1 / 2 threads"
                                               for family, dtype in groups) + " |", "|---|" + "---|" * len(groups)]
    for fraction in sorted({row["fraction"] for row in rows}):
        cells = [f"{fraction:g}"]
        for family, dtype in groups:
            parts = []
            for threads in (1, 2):
                speedups = [row["speedup"] for row in rows if row["fraction"] == fraction and row["dtype"] == dtype
                            and row["threads"] == threads and row["shape"].startswith(family + " ")]
                parts.append(f"{min(speedups):.2f} / {statistics.median(speedups):.2f} ×")
            cells.append(" · ".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_memory_table() -> str:
    """docs/results/real-model.md: loading a 7B-shaped compressed checkpoint (benchmarks/scale/load_memory.py)."""
    gib = 2 ** 30
    names = {"streamrom": "`streamrom.load`", "transformers": "transformers (`trust_remote_code`)"}
    lines = ["| loader | load | RSS before | peak RSS (sampled / OS) | after touching every weight (anonymous + "
             "file-backed) | (peak − before) / file | resident dtype |", "|---|---|---|---|---|---|---|"]
    for row in json.loads((RESULTS / "load_memory.json").read_text())["rows"]:
        dtypes = ", ".join(dtype.removeprefix("torch.").replace("bfloat16", "bf16") for dtype in row["parameter_dtypes"])
        lines.append(f"| {names[row['loader']]} | {row['load_seconds']:.1f} s | {row['rss_before_bytes'] / gib:.2f} GiB "
                     f"| {row['peak_rss_bytes'] / gib:.2f} / {row['os_peak_rss_bytes'] / gib:.2f} GiB "
                     f"| {row['rss_steady_bytes'] / gib:.2f} GiB ({row['steady_anonymous_bytes'] / gib:.2f} + "
                     f"{row['steady_file_backed_bytes'] / gib:.2f}) | **{row['load_peak_over_file']:.3f}** | {dtypes} |")
    return "\n".join(lines)


def targeted_table() -> str:
    """docs/results/real-model.md: general, target-only, mixed and selected calibration for held-out code and
    prose (benchmarks/quality/targeted.py); the best of the three targeted rows in bold."""
    found = json.loads((RESULTS / "targeted.json").read_text())
    rows = {row["key"]: row for row in found["rows"]}
    weight = found["target_weight"]
    names = {"general": "general (*Emma*, the default then)", "target": "target only (`--calib-text` code)",
             "mix": f"mix (`--target-text` code, α = {weight:g})", "select": "mix + `--target-basis select`"}

    def versus(value: float, general: float) -> str:
        ratio = value / general
        return f"{ratio:.4f} ×" if ratio < 0.1 else f"{ratio:.1f} ×" if ratio > 2 else _change(value, general)

    lines = ["| reduction | calibration | held-out code perplexity | code vs general | prose perplexity | "
             "prose vs general |", "|---|---|---|---|---|---|"]
    for size in sorted({row["reduction"] for row in found["rows"] if row["reduction"]}):
        general = rows[f"general/{size}"]
        targeted = [rows[f"{variant}/{size}"] for variant in ("target", "mix", "select")]
        best = {text: min(row[text] for row in targeted) for text in ("code", "prose")}
        for variant in names:
            row = rows[f"{variant}/{size}"]
            if variant == "general":
                lines.append(f"| {size} % | {names[variant]} | {_perplexity(row['code'])} | | {_perplexity(row['prose'])} | |")
                continue
            lines.append(f"| {size} % | {names[variant]} | {_perplexity(row['code'], best['code'])} "
                         f"| {versus(row['code'], general['code'])} | {_perplexity(row['prose'], best['prose'])} "
                         f"| {versus(row['prose'], general['prose'])} |")
    return "\n".join(lines)


def general_table() -> str:
    """docs/results/real-model.md: Emma alone, the general set, and the general set without the evaluated
    genre, on every genre's held-out text (benchmarks/quality/general.py)."""
    found = json.loads((RESULTS / "general.json").read_text())
    rows = {row["key"]: row["perplexity"] for row in found["rows"]}
    texts = {"austen": "Austen", "carroll": "Carroll", "docs": "Python documentation", "code": "Python code"}

    def versus(value: float, reference: float) -> str:
        return f"{100 * (value / reference - 1):+.0f} %".replace("-", "−")

    lines = ["| reduction | method | held-out text | dense | Emma alone | general set (in genre) | vs Emma "
             "| general set without that genre (out of genre) | vs Emma |", "|---|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(key.split("/")[0] for key in rows if key != "dense"))
    for method in methods:
        for size in (20, 40):
            for text, name in texts.items():
                emma = rows[f"{method}/spectrum/{size}/emma"][text]
                general = rows[f"{method}/spectrum/{size}/general"][text]
                without = rows[f"{method}/spectrum/{size}/without-{text}"][text]
                lines.append(f"| {size} % | `{method}` | {name} | {rows['dense'][text]:.2f} | {emma:.2f} | {general:.2f} "
                             f"| {versus(general, emma)} | {without:.2f} | {versus(without, emma)} |")
    return "\n".join(lines)


def real_model_table() -> str:
    """docs/results/real-model.md: the dense model and the first factored variants on the whole of Pride and
    Prejudice (benchmarks/quality/real_model.py); each variant named by its compress options."""
    lines = ["| variant | parameters kept | perplexity | compress time | compress peak RSS (sampled / OS) | "
             "eval peak RSS | size on disk |", "|---|---|---|---|---|---|---|"]
    for row in json.loads((RESULTS / "real_model.json").read_text())["rows"]:
        if "compress_command" not in row:
            lines.append(f"| {row['variant']} | 1.000 | {row['perplexity']:.2f} | - | - "
                         f"| {row['eval_peak_rss_bytes'] / MIB:.0f} MiB | {row['bytes_on_disk'] / MIB:.0f} MiB |")
            continue
        words = row["compress_command"].split()
        options = words[words.index("compress") + 3:words.index("--overwrite")]
        lines.append(f"| `{' '.join(options)}` | {row['parameter_ratio']:.3f} | {row['perplexity']:.2f} "
                     f"| {row['compress_seconds']:.0f} s | {row['compress_peak_rss_bytes'] / MIB:.0f} / "
                     f"{row['compress_os_peak_rss_bytes'] / MIB:.0f} MiB | {row['eval_peak_rss_bytes'] / MIB:.0f} MiB "
                     f"| {row['bytes_on_disk'] / MIB:.0f} MiB |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"scale": scale_table, "profile": profile_table, "factored": factored_table, "speed": factored_speed_table,
                                        "real-model": real_model_table,
                                        "general": general_table,
                                        "targeted": targeted_table,
                                        "load": load_memory_table,
                                        "structured": structured_table, "anchored": anchored_table,
                                        "inference": inference_table, "first-use": first_use_table,
                                        "gemma3-grid": gemma3_grid_table, "embedding-rank": embedding_rank_table,
                                        "calibration-volume": calibration_volume_table,
                                        "refinement": refinement_table, "bayes-mixed": bayes_mixed_table,
                                        "anchor-levers": anchor_levers_table,
                                        "combined-levers": combined_levers_table,
                                        "refinement-scale": refinement_scale_table,
                                        "thread-scaling": thread_scaling_table}


def render(text: str) -> str:
    """`text` with every generated table written again."""
    def again(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise KeyError(f"no generated table named {name!r} (benchmarks/tables.py: TABLES)")
        return f"{START.format(name=name)}\n{TABLES[name]()}\n{END}"

    # the table between the marks may be empty (a new section), and never reaches past the next START
    start, next_start = re.escape(START).replace(re.escape("{name}"), r"([\w-]+)"), re.escape(START.split("{name}")[0])
    pattern = start + r"\n(?:(?:(?!" + next_start + r").)*?\n)?" + re.escape(END)
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
