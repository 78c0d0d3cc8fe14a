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

Two more measurements locate the loss. *Module swap*: the uncentered model with one module type
(q, k, v, o, gate, up or down, in every block) taken from the centered model, its perplexity on
Pride and Prejudice — for the pair at --ratio and for the pair that the spectrum allocation makes at
--spectrum-reduction (the same command as benchmarks/quality/grid.py's row, so the two share the folder
and pass 1). *Value sink*: per block, on the dense model's own block inputs, how much attention
goes to the first position and how large its value vector is next to the others', and the relative
error of each variant's v_proj at that position and at the rest.

Results: benchmarks/results/centered.json and a Markdown table on stdout.

    python -m benchmarks.quality.centered --max-windows 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import EMMA, EVAL_TEXT, REPO, dense_model, header, run, streamrom_cli

from benchmarks.quality.grid import quality_row

import streamrom
from streamrom.stream.calibration import evaluation_windows, load_tokenizer, tokenize_files


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


MODULE_TYPES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
                "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    return float(hidden_states(model, ids)[1].mean().exp())


@torch.no_grad()
def module_swap(base, donor, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of `base` with each module type, in every block, taken from `donor` (then put back)."""
    result = {"base": perplexity(base, ids), "donor": perplexity(donor, ids)}
    for short, (part, name) in MODULE_TYPES.items():
        kept = [getattr(getattr(block, part), name) for block in base.layers]
        for block, other in zip(base.layers, donor.layers):
            setattr(getattr(block, part), name, getattr(getattr(other, part), name))
        result[short] = perplexity(base, ids)
        for block, module in zip(base.layers, kept):
            setattr(getattr(block, part), name, module)
    return result


@torch.no_grad()
def value_sink(dense, variants: dict, ids: torch.Tensor) -> list[dict]:
    """Per block, on the dense model's block inputs: attention on position 0 and the v_proj errors there."""
    x = dense.embed_tokens(ids)
    cos, sin = dense.rotary.cos_sin(ids.shape[-1])
    per_block = []
    for index, block in enumerate(dense.layers):
        attn, h = block.self_attn, block.input_layernorm(x)
        value = attn.v_proj(h)
        size = value.pow(2).sum(-1)
        # The model's own attention with every value 1 at position 0 and 0 elsewhere: each output is
        # then the attention weight its query gives position 0.
        indicator = torch.zeros_like(value)
        indicator[:, 0] = 1.0
        replace_values = attn.v_proj.register_forward_hook(lambda module, args, output: indicator)
        try:
            on_first = attn.core(h, cos, sin)
        finally:
            replace_values.remove()
        entry = {"attention_on_position_0": float(on_first[:, 16:].mean()),  # queries past the first few
                 "value_norm2_position_0": float(size[:, 0].mean()),
                 "value_norm2_other_positions": float(size[:, 1:].mean())}
        for method, model in variants.items():
            error = (model.layers[index].self_attn.v_proj(h) - value).pow(2).sum(-1)
            entry[method] = {"position_0": float(error[:, 0].sum() / size[:, 0].sum()),
                             "other_positions": float(error[:, 1:].sum() / size[:, 1:].sum())}
        per_block.append(entry)
        x = block(x, cos, sin)
    return per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--spectrum-reduction", type=int, default=40,
                        help="whole-model reduction (percent) of the spectrum-allocated pair for the module swap")
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
                       "--overwrite", "--calib-text", str(EMMA)])

    spectrum_pair = {}
    for method in ("rom", "rom-centered"):  # benchmarks/quality/grid.py's row: the same folder and pass 1
        spectrum_pair[method], command = quality_row(cli, dense, args.work, method, "spectrum", args.spectrum_reduction)
        if not (spectrum_pair[method] / "model.safetensors.index.json").is_file():
            run(command)

    tokenizer = load_tokenizer(dense)
    texts = {"held_out": EVAL_TEXT, "calibration": EMMA}
    result = {"header": header("quality.centered"), "ratio": args.ratio, "windows": args.max_windows,
              "texts": {name: path.name for name, path in texts.items()}}
    models = {name: streamrom.load(folder) for name, folder in {"dense": dense, **outputs}.items()}
    windows = {text: torch.from_numpy(evaluation_windows(tokenize_files(tokenizer, [path]), 512, args.max_windows))
               for text, path in texts.items()}
    for text, ids in windows.items():
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

    held_out = windows["held_out"]
    result["module_swap"] = {f"ratio_{args.ratio}": module_swap(models["rom"], models["rom-centered"], held_out)}
    spectrum_models = {method: streamrom.load(folder) for method, folder in spectrum_pair.items()}
    result["module_swap"][f"spectrum_{args.spectrum_reduction}"] = module_swap(
        spectrum_models["rom"], spectrum_models["rom-centered"], held_out)
    del spectrum_models
    result["value_sink"] = value_sink(models["dense"], {m: models[m] for m in outputs}, held_out[:4])
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

    print(f"\nModule swap on {EVAL_TEXT.name}, {args.max_windows} windows: perplexity of the uncentered model with "
          "one module type (every block) from the centered one")
    print("| pair | rom | rom-centered | " + " | ".join(f"{t} from centered" for t in MODULE_TYPES) + " |")
    print("|---|---|---|" + "---|" * len(MODULE_TYPES))
    for pair, swap in result["module_swap"].items():
        print(f"| {pair} | {swap['base']:.2f} | {swap['donor']:.2f} | "
              + " | ".join(f"{swap[t]:.2f} ({swap[t] / swap['base'] - 1:+.1%})" for t in MODULE_TYPES) + " |")
    print(f"\nValue sink on {EVAL_TEXT.name}, 4 windows, dense block inputs")
    print("| block | attention on position 0 | ‖v‖² position 0 / others | v_proj error at position 0: rom / centered "
          "| elsewhere: rom / centered |")
    print("|---|---|---|---|---|")
    for index, entry in enumerate(result["value_sink"]):
        print(f"| {index} | {entry['attention_on_position_0']:.2f} | {entry['value_norm2_position_0']:.3g} / "
              f"{entry['value_norm2_other_positions']:.3g} | {entry['rom']['position_0']:.2f} / "
              f"{entry['rom-centered']['position_0']:.2f} | {entry['rom']['other_positions']:.3f} / "
              f"{entry['rom-centered']['other_positions']:.3f} |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
