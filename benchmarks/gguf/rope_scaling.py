"""Rope scaling through export-gguf, checked by llama.cpp itself (llama-cpp-python).

A small random-weight llama (4 heads of 64, 3 blocks, SmolLM2's tokenizer: llama.cpp needs merges) is
saved three times, with no rope scaling, with Llama 3's (`llama3`: the export writes a rope_freqs
tensor) and with linear scaling (the export writes the scaling type and factor), exported with
`streamrom export-gguf` and run by llama.cpp on 200 tokens: its logits against `streamrom.load`'s of the
same checkpoint (largest difference over the largest logit). Control: the same weights read by
streamrom without their scaling, against llama.cpp's run of the scaled export — the scaling must
matter by much more than the agreement's error, or the check proves nothing. Random weights: a test
of the rotation, not of quality. llama-cpp-python: see benchmarks/gguf/in_llama_cpp.py for the build.
Results: benchmarks/results/gguf_rope_scaling.json.

    python -m benchmarks.gguf.rope_scaling
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, dense_model, header, streamrom_cli


import streamrom

SCALINGS = {
    "none": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float64)


def relative_gap(theirs: np.ndarray, folder: Path, ids: list[int]) -> float:
    ours = streamrom.load(folder, dtype=torch.float32)(torch.tensor([ids])).double().numpy()[0]
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


def main() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit('llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install '
                         "llama-cpp-python (compiles llama.cpp)") from None
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer_source = dense_model(REPO / ".cache" / "bench", streamrom_cli(None))
    ids = np.random.default_rng(1).integers(0, 49152, 200).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, scaling in SCALINGS.items():
            torch.manual_seed(0)
            source = root / name
            config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                                 rope_scaling=scaling)
            AutoModelForCausalLM.from_config(config).save_pretrained(source)
            shutil.copy(tokenizer_source / "tokenizer.json", source / "tokenizer.json")
            exported = root / f"{name}.gguf"
            subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", "export-gguf", str(source),
                            str(exported)], check=True)
            theirs = llama_cpp_logits(exported, ids)
            row = {"rope_scaling": name, "llama_cpp_vs_streamrom": relative_gap(theirs, source, ids)}
            if scaling is not None:  # control: the same weights without their scaling
                unscaled = root / f"{name}-unscaled"
                shutil.copytree(source, unscaled)
                settings = json.loads((unscaled / "config.json").read_text())
                settings["rope_scaling"] = None
                settings.pop("rope_parameters", None)
                (unscaled / "config.json").write_text(json.dumps(settings))
                row["control_streamrom_without_scaling"] = relative_gap(theirs, unscaled, ids)
            rows.append(row)
    out = REPO / "benchmarks" / "results" / "gguf_rope_scaling.json"
    out.write_text(json.dumps({"header": header("gguf.rope_scaling"),
                               "description": "rope scaling through export-gguf, run by llama.cpp",
                               "tokens": len(ids), "rows": rows}, indent=2) + "\n")
    print("| rope scaling | llama.cpp vs streamrom (max |Δ logit| / max |logit|) | control: streamrom without the scaling |")
    print("|---|---|---|")
    for row in rows:
        control = row.get("control_streamrom_without_scaling")
        print(f"| {row['rope_scaling']} | {row['llama_cpp_vs_streamrom']:.1e} | "
              f"{'-' if control is None else f'{control:.1e}'} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
