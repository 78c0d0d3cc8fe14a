"""Kill a command at every point, rerun it, and check what it leaves (reliability round three).

A point is either the moment the command has written its k-th log line to stderr (the points the
code already marks: every block, stage and file it logs) or a moment a given number of seconds after
its start (the moments between). At a point the whole process group gets SIGKILL, as a crash or the
OOM killer would; then the same command runs again to the end. It must exit 0 (or, when the first
run had already finished its work, refuse with exit 4 on a finished output) and leave every output
file byte for byte as an uninterrupted run's, no lock, work folder or temporary, and the source as it
was.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Files a run writes that record times or the machine, compared by presence only.
TIMED_FILES = ("streamrom-report.json", "streamrom-report-rss.png", "streamrom-report-ranks.png", "report.json",
               "eval.json")


@dataclass
class Command:
    """One streamrom command line: what it reads (`source`) and writes (`outputs`, files or folders)."""

    name: str
    args: list[str]
    source: Path
    outputs: list[Path]
    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "streamrom.cli", *self.args]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path`), by relative name; timed files by presence."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = {}
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        found[name] = "present" if file.name in TIMED_FILES else hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def leftovers(command: Command) -> list[str]:
    """Locks, work folders, progress records and temporaries a finished command must not leave: dot-named
    entries inside an output folder, and dot-named entries beside each output named after it."""
    found = []
    for output in command.outputs:
        if output.is_dir():
            found += [str(p) for p in output.iterdir() if p.name.startswith(".")]
        found += [str(p) for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
    return found


def run_to_end(command: Command, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **command.env}
    env.pop("STREAMROM_FAULT", None)
    return subprocess.run(command.argv(), capture_output=True, text=True, env=env, timeout=timeout)


def run_and_kill(command: Command, line: int | None = None, seconds: float | None = None,
                 timeout: float = 600) -> tuple[int, int]:
    """Runs `command` and SIGKILLs its process group when it has written `line` lines to stderr (0: as
    soon as it starts) or after `seconds`; returns (its exit status, lines seen). A run that ends first
    returns its own status."""
    env = {**os.environ, **command.env}
    env.pop("STREAMROM_FAULT", None)
    process = subprocess.Popen(command.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    seen, start = 0, time.monotonic()
    try:
        if seconds is not None:
            try:
                process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        else:
            if line == 0:
                os.killpg(process.pid, signal.SIGKILL)
            for _ in process.stderr:
                seen += 1
                if seen == line:
                    os.killpg(process.pid, signal.SIGKILL)
                    break
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"{command.name} ran past {timeout} s")
        return process.wait(timeout=timeout), seen
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


@dataclass
class Reference:
    outputs: dict[str, dict[str, str]]
    lines: int
    seconds: float


def reference(command: Command) -> Reference:
    """An uninterrupted run: its outputs' digests, its log lines and its time."""
    start = time.monotonic()
    result = run_to_end(command)
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"{command.name}: {result.stderr[-2000:]}"
    return Reference({str(o): digest(o) for o in command.outputs}, len(result.stderr.splitlines()), seconds)


def clear(command: Command) -> None:
    import shutil

    for output in command.outputs:
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        for stray in output.parent.glob(f".{output.name}*"):
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()


def kill_and_rerun(command: Command, expected: Reference, line: int | None = None,
                   seconds: float | None = None) -> str:
    """One point: kill there, rerun, check. Returns what happened ("identical", "identical (finished
    before the kill)"); raises AssertionError with the reason otherwise."""
    clear(command)
    source_before = digest(command.source)
    status, _ = run_and_kill(command, line=line, seconds=seconds)
    again = run_to_end(command)
    # a run that had finished its work before the kill leaves a finished output, which the same command
    # refuses to replace without --overwrite (exit 4); the comparison below says whether it is whole
    finished_first = status == 0 or again.returncode == 4
    assert again.returncode == 0 or finished_first, f"{command.name}: rerun exit {again.returncode}: {again.stderr[-1500:]}"
    outputs = {str(o): digest(o) for o in command.outputs}
    assert outputs == expected.outputs, f"{command.name}: outputs differ from an uninterrupted run's: " + ", ".join(
        f"{o}: {sorted(set(outputs[o].items()) ^ set(expected.outputs[o].items()))[:4]}"
        for o in outputs if outputs[o] != expected.outputs[o])
    assert leftovers(command) == [], f"{command.name}: left behind {leftovers(command)}"
    assert digest(command.source) == source_before, f"{command.name}: the source changed"
    return "identical (finished before the kill)" if finished_first and again.returncode else "identical"
