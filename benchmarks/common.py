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

    command = [sys.executable, "-m", f"benchmarks.{benchmark}", *(sys.argv[1:] if argv is None else argv)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=REPO).stdout.strip())
    return {"benchmark": benchmark, "command": shlex.join(command), "commit": commit + ("-dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}
