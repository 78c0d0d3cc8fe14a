"""The long reliability run: every command killed at every point, every parser fuzzed at length.

Runs tests/test_kill_sweep.py with STREAMROM_KILL_SWEEP=full (each command killed after each of its log
lines and at eight moments, then rerun and compared byte for byte with an uninterrupted run) and
tests/test_hostile_inputs.py with STREAMROM_FUZZ_EXAMPLES (default 2000 cases per fuzzed parser), and
writes benchmarks/results/reliability_sweep.json and docs/reliability.md from what they record.

    python -m benchmarks.reliability.sweep [--examples 2000] [--only kill|fuzz] [--commands NAME ...]

--commands kills only the named commands and merges their rows into the recorded table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, header, runnable

RESULT = REPO / "benchmarks" / "results" / "reliability_sweep.json"
PAGE = REPO / "docs" / "reliability.md"
FAILURES = REPO / ".cache" / "reliability_failures.txt"  # pytest's own report of a failed run, kept to read


def pytest(test_file: str, env: dict[str, str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", test_file], cwd=REPO,
                            env={**os.environ, **env}, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode:
        FAILURES.parent.mkdir(exist_ok=True)
        with FAILURES.open("a") as kept:
            kept.write(f"== {test_file} {env} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{result.stdout}\n{result.stderr}\n")
        print(f"{test_file}: {summary}; pytest's report appended to {FAILURES}", file=sys.stderr)
    return result.returncode, round(time.perf_counter() - start, 1), summary


def page(results: dict) -> str:
    lines = ["# Reliability: every command killed at every point, every parser fuzzed", "",
             f"Written by `{runnable(results['header']['command'])}` at commit {results['header']['commit'][:10]} "
             f"({results['header']['date']}); the harness is tests/kill_harness.py, the fuzzers tests/test_hostile_inputs.py. "
             "A point is the moment a command has written its k-th log line (SIGKILL to its process group), or a moment "
             "between (a fraction of its uninterrupted time). After each kill the same command runs again to the end; "
             "*identical* means it exited 0 (or, where the killed run had finished its work, refused to replace the "
             "finished output with exit 4), every output file is byte for byte an uninterrupted run's (reports, which "
             "hold times, by presence), no lock, work folder or temporary is left, and the source is unchanged.", ""]
    kill = results.get("kill")
    if kill:
        lines += ["## Kill at every point", "", f"pytest: {kill['summary']} ({kill['seconds']} s)", "",
                  "| command | log lines | uninterrupted (s) | points killed | identical | finished before the kill |",
                  "|---|---|---|---|---|---|"]
        for name, row in kill["table"].items():
            results_ = [p[2] for p in row["points"]]
            lines.append(f"| `{name}` | {row['log lines']} | {row['uninterrupted seconds']} | {len(results_)} | "
                         f"{sum(r.startswith('identical') for r in results_)} | "
                         f"{sum('finished before' in r for r in results_)} |")
        lines.append("")
    fuzz = results.get("fuzz")
    if fuzz:
        lines += ["## Fuzzed parsers", "", f"pytest: {fuzz['summary']} ({fuzz['seconds']} s); "
                  f"{fuzz['examples']} cases per fuzzed test, each bounded to 20 s and 2 GiB more address space. "
                  "An outcome is *ok* (the file was used) or the exit code of the one-line error; a traceback, a hang or "
                  "an absurd allocation would have failed the run.", "",
                  "| parser | cases | ok | one line, exit 2 | one line, exit 3 | other |", "|---|---|---|---|---|---|"]
        for parser, outcomes in sorted(fuzz["counts"].items()):
            other = sum(v for k, v in outcomes.items() if k not in ("ok", "exit 2", "exit 3"))
            lines.append(f"| {parser} | {sum(outcomes.values())} | {outcomes.get('ok', 0)} | {outcomes.get('exit 2', 0)} | "
                         f"{outcomes.get('exit 3', 0)} | {other} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--only", choices=["kill", "fuzz"])
    parser.add_argument("--commands", nargs="*", default=[], help="kill only these commands (test_kill_sweep.NAMES, and tune-worker)")
    parser.add_argument("--moments", type=int, default=8, help="moments between log lines per command")
    args = parser.parse_args(argv)
    results = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    results["header"] = header("reliability.sweep", argv)
    if args.only in (None, "kill"):
        table = REPO / ".cache" / "kill_table.json"
        table.parent.mkdir(exist_ok=True)
        table.unlink(missing_ok=True)
        code, seconds, summary = pytest("tests/test_kill_sweep.py", {
            "STREAMROM_KILL_SWEEP": "full", "STREAMROM_KILL_TABLE": str(table), "STREAMROM_KILL_MOMENTS": str(args.moments),
            "STREAMROM_KILL_COMMANDS": ",".join(args.commands)})
        found = json.loads(table.read_text()) if table.is_file() else {}
        if args.commands and "kill" in results:  # a partial sweep updates its commands' rows, keeps the rest
            earlier = results["kill"]
            found = {**earlier["table"], **found}
            summary = f"{earlier['summary']}; then {', '.join(args.commands)}: {summary}"
            code, seconds = max(code, earlier["exit"]), round(earlier["seconds"] + seconds, 1)
        results["kill"] = {"exit": code, "seconds": seconds, "summary": summary, "table": found}
    if args.only in (None, "fuzz"):
        counts = REPO / ".cache" / "fuzz_counts.json"
        counts.unlink(missing_ok=True)
        code, seconds, summary = pytest("tests/test_hostile_inputs.py", {"STREAMROM_FUZZ_EXAMPLES": str(args.examples),
                                                                          "STREAMROM_FUZZ_REPORT": str(counts)})
        results["fuzz"] = {"exit": code, "seconds": seconds, "summary": summary, "examples": args.examples,
                           "counts": json.loads(counts.read_text()) if counts.is_file() else {}}
    RESULT.write_text(json.dumps(results, indent=1) + "\n")
    PAGE.write_text(page(results) + "\n")
    print(page(results))


if __name__ == "__main__":
    main()
