"""Task-targeted compression on a real code target: the Python standard library's own sources.

The running interpreter's stdlib `.py` files are split by top-level module name
(streamrom.stream.calibration.held_out, 20 % held out; the `test` package left out) into a calibration part
and an evaluation part; both lists go into the results. On the real model at whole-model reductions
of 20 % and 40 % (uniform allocation, so only the calibration differs), each of these is compressed
and evaluated on held-out code and on held-out prose (Pride and Prejudice):

- general: Emma (prose; the default calibration before the general set);
- target: the code calibration text alone;
- mix: general and target moments mixed per linear (`--target-text`, α = --target-weight);
- select: the mix, with basis selection (`--target-basis select`).

Results: benchmarks/results/targeted.json and a Markdown table on stdout.

    python -m benchmarks.quality.targeted --reductions 40 --max-windows 40
"""
from __future__ import annotations

import argparse
import json
import shlex
import sysconfig
from pathlib import Path

from benchmarks.common import EMMA, EVAL_TEXT, REPO, ResultRows, dense_model, run, streamrom_cli


from streamrom.stream.calibration import held_out

CALIBRATION_BYTES = 4_000_000  # plenty for 32 x 512 tokens drawn at random offsets
EVALUATION_BYTES = 1_000_000  # about 250k tokens, far more than 40 windows of 512 need
EXCLUDED = {"test", "idlelib", "lib2to3", "site-packages"}  # tests and tool data, not library code


def stdlib_split(fraction: float = 0.2) -> tuple[dict[str, list[Path]], set[str]]:
    """{"calibration": files, "evaluation": files} of the stdlib by top-level module, and the held-out names."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0].removesuffix(".py")
        if top in EXCLUDED or top.startswith("_sysconfigdata"):
            continue
        modules.setdefault(top, []).append(path)
    evaluation = held_out(modules, fraction, salt="stdlib")
    split = {"calibration": [p for m in sorted(modules) if m not in evaluation for p in modules[m]],
             "evaluation": [p for m in sorted(modules) if m in evaluation for p in modules[m]]}
    return split, evaluation


def write_text(files: list[Path], out: Path, limit: int) -> list[str]:
    """The files, concatenated up to `limit` bytes (whole files), as one text; returns the names used."""
    used, size, parts = [], 0, []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if size and size + len(text) > limit:
            break
        parts.append(f"# file: {path.name}\n{text}\n")
        used.append(str(path))
        size += len(text)
    out.write_text("".join(parts), encoding="utf-8")
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--variants", nargs="+", default=["general", "target", "mix", "select"])
    parser.add_argument("--target-weight", type=float, default=0.5)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "targeted.json")
    args = parser.parse_args()

    work = args.work / "targeted"
    work.mkdir(parents=True, exist_ok=True)
    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    split, evaluation_modules = stdlib_split()
    code_calibration, code_evaluation = work / "code-calibration.txt", work / "code-evaluation.txt"
    used = {"calibration": write_text(split["calibration"], code_calibration, CALIBRATION_BYTES),
            "evaluation": write_text(split["evaluation"], code_evaluation, EVALUATION_BYTES)}
    assert not set(used["calibration"]) & set(used["evaluation"])

    windows = ["--max-windows", str(args.max_windows)]
    results = ResultRows(args.out, "quality.targeted", args.max_windows)
    rows = results.rows

    def save() -> None:
        results.save(model="SmolLM2-135M-Instruct", target_weight=args.target_weight,
                     split={"held_out_modules": sorted(evaluation_modules),
                            "calibration_files": used["calibration"], "evaluation_files": used["evaluation"]})

    def evaluate(folder: Path, name: str) -> dict:
        scores = {}
        for label, text in (("code", code_evaluation), ("prose", EVAL_TEXT)):
            report = work / f"{name}.{label}.eval.json"
            run(cli + ["eval", str(folder), "--text", str(text), "--report", str(report), *windows])
            scores[label] = json.loads(report.read_text())["perplexity"]
        return scores

    if "dense" not in rows:
        rows["dense"] = {"key": "dense", "variant": "dense", "reduction": 0, **evaluate(dense, "dense")}
        save()
    variants = {
        "general": ["--calib-text", str(EMMA)],  # the general text before the general set: Emma
        "target": ["--calib-text", str(code_calibration)],
        "mix": ["--calib-text", str(EMMA), "--target-text", str(code_calibration),
                "--target-weight", str(args.target_weight)],
        "select": ["--calib-text", str(EMMA), "--target-text", str(code_calibration),
                   "--target-weight", str(args.target_weight), "--target-basis", "select"],
    }
    for reduction in args.reductions:
        for variant in args.variants:
            key = f"{variant}/{reduction}"
            output = work / f"{variant}-{reduction}"
            command = cli + ["compress", str(dense), str(output), "--target-params", f"{1 - reduction / 100:.2f}",
                             "--overwrite", *variants[variant]]
            seconds = run(command)
            rows[key] = {"key": key, "variant": variant, "reduction": reduction, "compress_seconds": seconds,
                         "command": shlex.join(["streamrom", *command[len(cli):]]),
                         "parameter_ratio": json.loads((output / "streamrom-report.json").read_text())["parameter_ratio"],
                         **evaluate(output, f"{variant}-{reduction}")}
            save()

    print("\n| reduction | calibration | code perplexity | prose perplexity | code vs general |")
    print("|---|---|---|---|---|")
    for row in sorted(rows.values(), key=lambda r: (r["reduction"], r["variant"])):
        general = rows.get(f"general/{row['reduction']}")
        versus = f"{row['code'] / general['code']:.4f}x" if general and row is not general else ""
        print(f"| {row['reduction']}% | {row['variant']} | {row['code']:.2f} | {row['prose']:.2f} | {versus} |")
    print(f"\nheld-out modules ({len(evaluation_modules)}): {', '.join(sorted(evaluation_modules)[:12])}, ...")
    print(f"written {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's targeted-calibration table


if __name__ == "__main__":
    main()
