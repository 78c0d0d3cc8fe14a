"""Why does uncentered ROM beat the centered variant with its mean-correction bias?

Per linear and on the calibration data, the centered variant is never worse: the best affine rank-r
fit (r directions of the covariance plus a bias) includes the best linear one. Yet perplexity says
the opposite. This script compresses the real model both ways at the same ranks (all 30 blocks at
--ratio), then runs the dense and both compressed models on windows of Pride and Prejudice (held
out) and of Emma (the calibration text) and reports, per block, the relative error of the hidden
states against the dense model's, split into the first position of each window and the rest, and the
loss split the same way. The first split tests whether the first position (the attention sink,
with its massive activations) is where centering loses; the second whether the loss is
generalisation (centered better on the calibration text, worse off it) or compounding through the
blocks (worse on both).

Results: benchmarks/results/centered.json and a Markdown table on stdout.

    python benchmarks/centered.py --max-windows 8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from real_model import EVAL_TEXT, dense_model, run, streamrom_cli  # noqa: E402

import streamrom  # noqa: E402
from streamrom.calibration import default_calibration_text, evaluation_windows, load_tokenizer, tokenize_files  # noqa: E402
from streamrom.report import machine  # noqa: E402


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output and the per-token NLL of the next token."""
    x = model.embed_tokens(ids)
    cos, sin = model.rotary.cos_sin(ids.shape[-1])
    states = []
    for block in model.layers:
        x = block(x, cos, sin)
        states.append(x)
    logits = F.linear(model.norm(x), model.lm_head_weight)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return states, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "centered.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    outputs = {}
    for method in ("rom", "rom-centered"):
        outputs[method] = args.work / f"centered-{method}-{args.ratio}"
        if not (outputs[method] / "model.safetensors.index.json").is_file():
            run(cli + ["compress", str(dense), str(outputs[method]), "--method", method, "--ratio", str(args.ratio),
                       "--overwrite"])

    tokenizer = load_tokenizer(dense)
    texts = {"held_out": EVAL_TEXT, "calibration": default_calibration_text()}
    result = {"benchmark": "centered", "ratio": args.ratio, "windows": args.max_windows, "machine": machine(),
              "texts": {name: path.name for name, path in texts.items()}}
    models = {name: streamrom.load(folder) for name, folder in {"dense": dense, **outputs}.items()}
    for text, path in texts.items():
        ids = torch.from_numpy(evaluation_windows(tokenize_files(tokenizer, [path]), 512, args.max_windows))
        reference, reference_nll = hidden_states(models["dense"], ids)
        entry = {"dense": {"perplexity": float(reference_nll.mean().exp())}}
        for method in outputs:
            states, nll = hidden_states(models[method], ids)
            per_block = []
            for dense_state, state in zip(reference, states):
                error = (state - dense_state).pow(2).sum(-1)
                size = dense_state.pow(2).sum(-1)
                per_block.append({
                    "first_position": float(error[:, 0].sum() / size[:, 0].sum()),
                    "other_positions": float(error[:, 1:].sum() / size[:, 1:].sum()),
                    # a few tokens with massive activations dominate the sums: the typical token too
                    "other_positions_median": float((error[:, 1:] / size[:, 1:]).median()),
                })
            entry[method] = {
                "perplexity": float(nll.mean().exp()),
                "nll_from_position_1": float(nll[:, 1:].mean()),
                "nll_of_position_0_prediction": float(nll[:, 0].mean()),
                "blocks": per_block,
            }
            del states
        result[text] = entry
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    for text, path in texts.items():
        entry = result[text]
        print(f"\n{path.name} ({text}), {args.max_windows} windows: perplexity dense {entry['dense']['perplexity']:.2f}, "
              f"rom {entry['rom']['perplexity']:.2f}, rom-centered {entry['rom-centered']['perplexity']:.2f}")
        print("| block | first position: rom / centered | other positions: rom / centered "
              "| median other position: rom / centered |")
        print("|---|---|---|---|")
        rom, centered = (entry[m]["blocks"] for m in ("rom", "rom-centered"))
        for index, (a, b) in enumerate(zip(rom, centered)):
            print(f"| {index} | {a['first_position']:.2e} / {b['first_position']:.2e} "
                  f"| {a['other_positions']:.2e} / {b['other_positions']:.2e} "
                  f"| {a['other_positions_median']:.2e} / {b['other_positions_median']:.2e} |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
