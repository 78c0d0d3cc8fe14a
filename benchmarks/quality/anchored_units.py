"""Why an anchored refit of a structured unit loses: the down refit on the kept neurons, block by block.

The `structured` method keeps some MLP neurons per block and refits down_proj on them by least squares
toward what the dense down_proj makes of the compressed model's neurons (plain target). Anchoring
moves that target to the dense model's own MLP outputs, and measured on the whole model it was worse
(README "Anchored fits"). This script takes a plain structured checkpoint and the dense model, runs
both over the same token windows, and at chosen blocks compares, on the MLP's output y and on the
block's output, for tokens the fits saw and for tokens they did not:

- plain: the checkpoint's own down_proj (fitted by compression on the 32 x 512 calibration tokens);
- anchored (α = 0.5, 1): least squares of the dense MLP output y on the kept neurons h̃_S,
  E[y h̃_Sᵀ] (E[h̃_S h̃_Sᵀ] + δ)⁻¹, blended with the plain fit (the refit is linear in its target);
- block-anchored: toward the dense block's output minus the compressed residual stream, i.e. what the
  MLP would have to add for the block's output to equal the dense block's (issue 17, item 3).

The anchored fits are made from the calibration tokens alone (what compression sees) and from more
windows of the calibration novel (calibration + extra), so that the learning curve shows whether the
loss is estimation error (more tokens close the gap) or a wrong target (they do not). Errors are
relative squared errors ‖target − fit‖² / ‖target‖² averaged over tokens; "seen" = the calibration
tokens, "Emma held out" = windows of the calibration novel that no fit saw, "P&P" = Pride and
Prejudice.
Results: benchmarks/results/anchored_units.json and a Markdown table on stdout.

    python -m benchmarks.quality.anchored_units --plain .cache/bench/anchored-quality-structured-spectrum-40-0
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, header

import streamrom
from streamrom.stream.calibration import (CalibrationConfig, calibration_tokens, evaluation_windows,
                                   held_out_windows, load_tokenizer, tokenize_files)
from streamrom.linalg.decompose import least_squares

EMMA = REPO / "streamrom" / "data" / "general" / "austen-emma.txt"
PRIDE = REPO / "data" / "austen" / "prideprejudice.txt"


class Capture:
    """Per chosen block, the values of the forward passes: down_proj's input and output, the block's
    output; float64 sums over the fit tokens, stored arrays for the test tokens."""

    def __init__(self, model: streamrom.CausalLM, blocks: list[int]):
        self.values: dict[int, dict[str, torch.Tensor]] = {}
        for index in blocks:
            layer = model.layers[index]
            layer.mlp.down_proj.register_forward_hook(self._hook(index, "down"))
            layer.register_forward_hook(self._hook(index, "block"))

    def _hook(self, index: int, kind: str):
        def hook(module, inputs, output):
            entry = self.values.setdefault(index, {})
            if kind == "down":
                entry["h"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                entry["y"] = output.detach().reshape(-1, output.shape[-1]).double()
            else:
                entry["out"] = output.detach().reshape(-1, output.shape[-1]).double()
        return hook


def run(dense, compressed, dense_capture, compressed_capture, windows: np.ndarray, chunk: int, sink) -> None:
    for start in range(0, len(windows), chunk):
        ids = torch.from_numpy(windows[start:start + chunk])
        dense(ids)
        compressed(ids)
        for index, values in compressed_capture.values.items():
            reference = dense_capture.values[index]
            sink(index, values["h"], values["out"] - values["y"], reference["y"], reference["out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", type=Path, required=True, help="a plain structured checkpoint (--anchor 0)")
    parser.add_argument("--dense", type=Path, default=REPO / ".cache" / "bench" / "smollm2")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 9, 14, 19, 24, 29])
    parser.add_argument("--extra", type=int, nargs="+", default=[32, 96],
                        help="extra Emma windows (512 tokens) the larger fits add to the calibration's 32")
    parser.add_argument("--test-windows", type=int, default=8)
    parser.add_argument("--damping", type=float, default=1e-6, help="the structured refit's (config.damping)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anchored_units.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = streamrom.load(args.dense, dtype=torch.float32)
    compressed = streamrom.load(args.plain, dtype=torch.float32)
    vocab = dense.spec.vocab_size
    calibration = CalibrationConfig(text_files=(EMMA,))
    seen = calibration_tokens(calibration, args.dense, vocab)
    unseen = held_out_windows(calibration, args.dense, vocab, max(args.extra) + args.test_windows)
    extra, emma_test = unseen[:max(args.extra)], unseen[max(args.extra):]
    if len(emma_test) < args.test_windows:
        raise SystemExit(f"Emma has {len(unseen)} windows no calibration sequence touches: too few")
    pride = evaluation_windows(tokenize_files(load_tokenizer(args.dense), [PRIDE]), 512, args.test_windows)
    dense_capture, compressed_capture = Capture(dense, args.blocks), Capture(compressed, args.blocks)

    # fit sums: C = Σ h hᵀ, cross_y = Σ y hᵀ (dense MLP output), cross_t = Σ t hᵀ (t = dense block
    # output − compressed residual), snapshotted after the calibration and after each extra count
    sums = {index: None for index in args.blocks}

    def accumulate(index, h, residual, y, out):
        target = out - residual
        add = {"C": h.T @ h, "cross_y": y.T @ h, "cross_t": target.T @ h, "n": h.shape[0]}
        sums[index] = add if sums[index] is None else {k: sums[index][k] + v for k, v in add.items()}

    snapshots: dict[int, dict[int, dict]] = {}
    run(dense, compressed, dense_capture, compressed_capture, seen, 4, accumulate)
    snapshots[0] = {i: dict(s) for i, s in sums.items()}
    done = 0
    for count in sorted(args.extra):
        run(dense, compressed, dense_capture, compressed_capture, extra[done:count], 4, accumulate)
        done = count
        snapshots[count] = {i: dict(s) for i, s in sums.items()}

    tests: dict[str, dict[int, list]] = {"seen": {}, "emma_held_out": {}, "pride": {}}

    def keep(name):
        def sink(index, h, residual, y, out):
            tests[name].setdefault(index, []).append((h, residual, y, out))
        return sink

    run(dense, compressed, dense_capture, compressed_capture, seen[:args.test_windows], 4, keep("seen"))
    run(dense, compressed, dense_capture, compressed_capture, emma_test, 4, keep("emma_held_out"))
    run(dense, compressed, dense_capture, compressed_capture, pride, 4, keep("pride"))

    def relative(target, fit):
        return float(((target - fit) ** 2).sum() / (target ** 2).sum())

    rows = []
    for index in args.blocks:
        plain = compressed.layers[index].mlp.down_proj.weight.double().numpy()
        kept = plain.shape[1]
        fits = {"plain": plain}
        for count, snapshot in snapshots.items():
            s = snapshot[index]
            gram = s["C"].numpy() / s["n"]
            anchored = least_squares(lambda: gram.copy(), (s["cross_y"].numpy() / s["n"]).T.copy(), args.damping)
            block = least_squares(lambda: gram.copy(), (s["cross_t"].numpy() / s["n"]).T.copy(), args.damping)
            tokens = (32 + count) * 512
            fits[f"anchored 0.5, {tokens} tokens"] = 0.5 * plain + 0.5 * anchored
            fits[f"anchored 1, {tokens} tokens"] = anchored
            fits[f"block-anchored, {tokens} tokens"] = block
        for name, fit in fits.items():
            row = {"block": index, "kept_neurons": kept, "neurons": dense.layers[index].mlp.down_proj.weight.shape[1],
                   "fit": name}
            for test, parts in tests.items():
                h, residual, y, out = (torch.cat(p) for p in zip(*parts[index]))
                mlp = h.numpy() @ fit.T
                row[f"{test}_mlp_error"] = relative(y.numpy(), mlp)
                row[f"{test}_block_error"] = relative(out.numpy(), residual.numpy() + mlp)
                # the block's error = the residual stream's (upstream, the same for every fit) + the MLP's
                # + twice their inner product: a negative one is the MLP undoing upstream error
                residual_error = (out - y).numpy() - residual.numpy()
                row[f"{test}_cross_term"] = float(2 * (residual_error * (y.numpy() - mlp)).sum() / (out ** 2).sum())
                row[f"{test}_residual_error"] = float((residual_error ** 2).sum() / (out ** 2).sum())
            rows.append(row)
            print(f"block {index:2d} ({kept}/{row['neurons']} neurons) {name:32s} "
                  + " ".join(f"{t}: mlp {row[f'{t}_mlp_error']:.4f} block {row[f'{t}_block_error']:.5f}" for t in tests),
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "header": header("quality.anchored_units"), "description": "anchored unit refits, block by block",
        "model": "SmolLM2-135M-Instruct",
        "plain_checkpoint": str(args.plain.resolve().relative_to(REPO)) if args.plain.resolve().is_relative_to(REPO)
        else str(args.plain),
        "calibration": "Emma, 32 x 512 (the compression's); extra: Emma windows no calibration sequence touches",
        "test_windows": args.test_windows, "damping": args.damping, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
