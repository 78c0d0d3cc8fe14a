"""The quantization-error correction's effect in transformers (issue 34: "the adapter loads in llama.cpp
(and in transformers) and its effect measured there").

For one quantized base (a GGUF from llama-quantize) and the PEFT adapter `streamrom correct --peft`
wrote for it: transformers' perplexity and mean KL divergence against the dense model on held-out
text of two genres, for the dense model, the base as transformers reads it (imported, dequantized:
float32), and the base with the adapter. The adapter is applied by PEFT where it is installed, else
added to the weights by hand (the same function: tests/test_export_gguf.py checks both).

    python -m benchmarks.quantization.correction_transformers --dense .cache/frontier/smollm2 \
        --base .cache/frontier/smollm2-files/dense-Q3_K_M.gguf --peft PEFT_FOLDER
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import REPO, header

EVAL_TEXTS = {"austen": REPO / "data" / "austen" / "prideprejudice.txt",
              "python-docs": REPO / "data" / "eval" / "python-docs.txt"}


def windows(folder: Path, text: Path, count: int, length: int) -> torch.Tensor:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text.read_text()).ids
    return torch.tensor(np.asarray(ids[:count * length]).reshape(count, length))


@torch.no_grad()
def log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(row[None]).logits.float(), dim=-1) for row in tokens])


def scores(model, tokens: torch.Tensor, reference: torch.Tensor | None) -> dict:
    logp = log_probs(model, tokens)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).mean().item()
    result = {"perplexity": float(np.exp(nll))}
    if reference is not None:
        result["kl"] = F.kl_div(logp, reference, log_target=True, reduction="sum").item() / (logp.shape[0] * logp.shape[1])
        result["top1"] = (logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return result, logp


def with_adapter(model, folder: Path):
    try:
        import peft
    except ImportError:
        from safetensors.torch import load_file

        settings = json.loads((folder / "adapter_config.json").read_text())
        for key, down in load_file(str(folder / "adapter_model.safetensors")).items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                up = load_file(str(folder / "adapter_model.safetensors"))[key.replace("lora_A", "lora_B")]
                scale = settings["alpha_pattern"].get(name, settings["lora_alpha"]) / settings["rank_pattern"].get(
                    name, settings["r"])
                with torch.no_grad():
                    model.get_submodule(name).weight += scale * (up.float() @ down.float())
        return model, "by hand"
    return peft.PeftModel.from_pretrained(model, folder).eval(), f"peft {peft.__version__}"


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="the quantized GGUF")
    parser.add_argument("--peft", type=Path, required=True, help="the PEFT folder `correct --peft` wrote")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "correction")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "correction_transformers.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    imported = args.work / args.base.stem
    if not (imported / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", "import-gguf", str(args.base), str(imported),
                        "--overwrite"], check=True)
        (imported / "tokenizer.json").write_bytes((args.dense / "tokenizer.json").read_bytes())
    rows = {}
    for genre, text in EVAL_TEXTS.items():
        tokens = windows(args.dense, text, args.windows, args.seqlen)
        dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
        rows.setdefault("dense", {})[genre], reference = scores(dense, tokens, None)
        del dense
        base = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
        rows.setdefault("base", {})[genre], _ = scores(base, tokens, reference)
        corrected, how = with_adapter(base, args.peft)
        rows.setdefault("base + adapter", {})[genre], _ = scores(corrected, tokens, reference)
        del base, corrected
    result = {"header": header("quantization.correction_transformers"), "base": str(args.base), "adapter": str(args.peft),
              "applied": how, "windows": args.windows, "seqlen": args.seqlen, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | " + " | ".join(f"ppl {g} | KL {g}" for g in EVAL_TEXTS) + " |")
    print("|---|" + "---|---|" * len(EVAL_TEXTS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[g]['perplexity']:.2f} | {row[g].get('kl', 0):.4f}" for g in EVAL_TEXTS)
              + " |")


if __name__ == "__main__":
    main()
