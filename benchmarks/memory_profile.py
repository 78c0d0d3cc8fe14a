"""Memory and time of `streamrom compress` on random-weight checkpoints with Llama-2-7B/13B block
shapes (benchmarks/synthetic.py), at chosen depths.

Each run is a child process; this script samples the child's RSS every 0.1 s (timeline CSV) and reads
the child's own report: sampled and OS peak RSS, seconds per stage, and the estimate of the peak's
parts. Results: benchmarks/results/memory_<shape>.json and memory_<shape>_d<depth>_rss.csv.

    python benchmarks/memory_profile.py 7b --depths 2 4 8
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import random_tokens, write_synthetic  # noqa: E402

from streamrom.report import machine  # noqa: E402


def profile(command: list[str], timeline_csv: Path) -> tuple[float, int]:
    """Run `command`, sampling its RSS; returns (wall seconds, sampled peak bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO)
    process = psutil.Process(child.pid)
    samples = []
    while child.poll() is None:
        try:
            samples.append((time.perf_counter() - start, process.memory_info().rss))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if child.wait() != 0:
        raise SystemExit(f"command failed ({child.returncode}): {shlex.join(command)}")
    with open(timeline_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_bytes"])
        writer.writerows((f"{t:.2f}", rss) for t, rss in samples)
    return time.perf_counter() - start, max((rss for _, rss in samples), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["7b", "13b"])
    parser.add_argument("--depths", type=int, nargs="+", default=[2])
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, help="torch threads in the compress run")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tokens = random_tokens(args.work / "tokens.npy", args.sequences * args.seqlen * 4)
    rows = []
    for depth in args.depths:
        source = write_synthetic(args.shape, depth, args.work / f"{args.shape}-{depth}")
        output = args.work / f"{args.shape}-{depth}-rom"
        report_path = args.work / f"{args.shape}-{depth}.report.json"
        command = [sys.executable, "-m", "streamrom.cli", "--quiet"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        command += ["compress", str(source), str(output), "--ratio", str(args.ratio), "--calib-tokens",
                    str(tokens), "--calib-sequences", str(args.sequences), "--calib-seqlen", str(args.seqlen),
                    "--overwrite", "--report", str(report_path)]
        timeline = args.results / f"memory_{args.shape}_d{depth}_rss.csv"
        print("$", shlex.join(command[1:]), flush=True)
        wall, sampled_here = profile(command, timeline)
        report = json.loads(report_path.read_text())
        memory = report["memory"]
        rows.append({
            "depth": depth, "command": shlex.join(["streamrom", *command[3:]]),
            "wall_seconds": wall, "stage_seconds": report["stage_seconds"],
            "peak_rss_bytes": max(memory["peak_rss_bytes"], sampled_here),
            "os_peak_rss_bytes": memory["os_peak_rss_bytes"],
            "estimate": memory["estimate"], "estimated_peak_bytes": memory["estimated_peak_bytes"],
            "source_bytes_on_disk": memory["source_bytes_on_disk"],
            "calibration_tokens": args.sequences * args.seqlen, "timeline_csv": timeline.name,
        })
    result = {"benchmark": "memory_profile", "shape": args.shape, "ratio": args.ratio, "machine": machine(),
              "rows": rows}
    out = args.results / f"memory_{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 2 ** 20
    print("\n| depth | wall | forward | statistics | eigen | read+write | peak RSS (sampled / OS) "
          "| estimate | measured/estimate | on disk |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        st = row["stage_seconds"]
        print(f"| {row['depth']} | {row['wall_seconds']:.0f} s | {st.get('forward', 0):.0f} s "
              f"| {st.get('statistics', 0):.0f} s | {st.get('eigen', 0):.0f} s "
              f"| {st.get('read', 0) + st.get('write', 0):.0f} s "
              f"| {row['peak_rss_bytes'] / mib:.0f} / {row['os_peak_rss_bytes'] / mib:.0f} MiB "
              f"| {row['estimated_peak_bytes'] / mib:.0f} MiB "
              f"| {row['peak_rss_bytes'] / row['estimated_peak_bytes']:.2f} "
              f"| {row['source_bytes_on_disk'] / mib:.0f} MiB |")
    print("estimate parts (MiB):", {k: round(v / mib) for k, v in rows[-1]["estimate"].items()})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
