"""A low-rank tied embedding on Gemma 3 270M (issue 31): is it the lever a model whose embedding is most
of its parameters needs? A study of the lever before streamrom has it as an option.

Gemma 3 270M's tied embedding E (262,144 x 640) is 168 M of its 268 M parameters, so the blocks alone
must give up 54 % of theirs for the model to be 20 % smaller. A rank-r embedding E' = U W (U: vocab x r,
W: r x hidden) saves (hidden - r) x vocab - r x hidden parameters. The head reads E' h, so its error is
E (I - Q) h over the final hidden states h: with their second moment C (calibration tokens, dense
model), the best rank-r head is E Q with Q = C^1/2 B B^T C^-1/2, B the top r right singular vectors of
E C^1/2 (a weighted least squares, as ROM fits a linear). The same E' is the input embedding (tied).
This script writes each variant as a dense-shaped checkpoint holding E' (what a factored one computes,
bit for bit up to rounding) and scores it with `streamrom eval`:

- `head-weighted r`: E' = E Q at rank r, tied (both sides);
- `plain 512`: E' from the plain truncated SVD of E (no data), tied;
- `head side only 512` / `input side only 512`: the model untied, E' on one side and E on the other
  (which side loses what);
- `head-weighted 512 + mixed blocks`: the blocks compressed by `--method mixed --allocate spectrum` from
  the rank-512 embedding's checkpoint, to a whole model `--reduction` % smaller with the embedding's
  saving counted (the compress target is raised by it, since compress counts the embedding dense).

Calibration: the general set, 32 x 512 tokens with BOS (compress's default); evaluation: `streamrom eval`,
each window starting with BOS, on held-out texts of several genres.
Results: benchmarks/results/embedding_rank.json and a table.

    python -m benchmarks.quality.embedding_rank --ranks 576 512 448 --genres austen docs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import GENRES, REPO, ResultRows, compressed_with_spectrum, perplexity_by_genre, run, \
    streamrom_cli
from benchmarks.quality.gemma3_grid import gemma3_folder
from benchmarks.tables import embedding_rank_table
from streamrom.linalg.embedding import head_weighted_factors

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def final_hidden_moment(dense: Path, threads: int) -> torch.Tensor:
    """Second moment (hidden x hidden, float64) of the final-normed hidden states over compress's default
    calibration tokens, from the dense model held in memory."""
    import streamrom
    from streamrom.compression.config import CalibrationConfig
    from streamrom.stream.calibration import calibration_tokens

    torch.set_num_threads(threads)
    model = streamrom.load(dense)
    tokens = calibration_tokens(CalibrationConfig(), dense, model.spec.vocab_size)
    moment = torch.zeros(model.spec.hidden_size, model.spec.hidden_size, dtype=torch.float64)
    count = 0

    def summed(_module, _inputs, output):
        nonlocal count
        flat = output.detach().double().reshape(-1, output.shape[-1])
        moment.add_(flat.T @ flat)
        count += flat.shape[0]

    hook = model.norm.register_forward_hook(summed)
    for row in tokens:
        model(torch.from_numpy(row.astype("int64"))[None])
    hook.remove()
    return moment / count


def head_weighted(embedding: torch.Tensor, moment: torch.Tensor, rank: int) -> torch.Tensor:
    """E Q: the rank-`rank` embedding whose head best matches E h over hidden states of second moment
    `moment` (streamrom.linalg.embedding; float64 in, float64 out). The results file was made by this
    script's own torch version of the same fit, equal to it within 1e-12 of the largest entry."""
    codes, expand = head_weighted_factors(embedding.double().numpy(), moment.double().numpy(), rank)
    return torch.from_numpy(codes @ expand)


def plain(embedding: torch.Tensor, rank: int) -> torch.Tensor:
    right = torch.linalg.svd(embedding, full_matrices=False)[2][:rank]
    return embedding @ right.T @ right


def write_variant(dense: Path, output: Path, tensors: dict, embedding: torch.Tensor,
                  head: torch.Tensor | None = None) -> Path:
    """A copy of the dense folder with the embedding replaced (and, given `head`, the model untied)."""
    output.mkdir(parents=True, exist_ok=True)
    for item in dense.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            shutil.copy(item, output / item.name)
    changed = {**tensors, EMBED: embedding.float().contiguous()}
    if head is not None:
        config = json.loads((output / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (output / "config.json").write_text(json.dumps(config, indent=2))
        changed[LM_HEAD] = head.float().contiguous()
    save_file(changed, output / "model.safetensors", metadata={"format": "pt"})
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[576, 512, 448])
    parser.add_argument("--reduction", type=int, default=20, help="whole-model reduction of the combined row (%%)")
    parser.add_argument("--genres", nargs="+", default=["austen", "docs"], choices=list(GENRES))
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embedding_rank.json")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cli = streamrom_cli(args.threads)
    dense = gemma3_folder(args.work, cli, {**os.environ, "PYTHONPATH": str(REPO)})
    results = ResultRows(args.out, "quality.embedding_rank", args.max_windows)
    rows = results.rows
    texts = {genre: GENRES[genre][1] for genre in args.genres}

    def save() -> None:
        results.save(model="Gemma 3 270M (dequantised from its Q4_K_M GGUF)",
                     calibration="the general set, 32 x 512 tokens with BOS",
                     evaluation_texts={genre: str(path.relative_to(REPO)) for genre, path in texts.items()})

    tensors = load_file(dense / "model.safetensors")
    embedding = tensors[EMBED].double()
    vocab, hidden = embedding.shape
    total = sum(tensor.numel() for tensor in tensors.values())
    moment_file = args.work / "embedding-rank-moment.pt"
    if not moment_file.is_file():
        torch.save(final_hidden_moment(dense, args.threads), moment_file)
    moment = torch.load(moment_file)

    def saved(rank: int) -> int:
        return (hidden - rank) * vocab - rank * hidden

    def measure(key: str, folder: Path, rank: int | None, ratio: float | None, **fields) -> None:
        """Score `folder` as row `key` (`ratio`: its parameters over the dense model's; None where the
        untied model's count says nothing), then remove the folder unless it is the dense model."""
        rows[key] = {"key": key, "rank": rank, "parameter_ratio": ratio, **fields,
                     "perplexity": perplexity_by_genre(run, cli, folder, str(args.work / f"embrank-{key.replace(' ', '_')}"),
                                                       texts, args.max_windows)}
        save()
        if folder != dense:
            shutil.rmtree(folder, ignore_errors=True)

    variant = args.work / "embrank-variant"
    if "dense" not in rows:
        measure("dense", dense, None, 1.0)
    for rank in args.ranks:
        key = f"head-weighted {rank}"
        if key not in rows:
            measure(key, write_variant(dense, variant, tensors, head_weighted(embedding, moment, rank)), rank,
                    1 - saved(rank) / total)
    reduced = head_weighted(embedding, moment, 512)
    if "plain 512" not in rows:
        measure("plain 512", write_variant(dense, variant, tensors, plain(embedding, 512)), 512, 1 - saved(512) / total)
    if "head side only 512" not in rows:
        measure("head side only 512", write_variant(dense, variant, tensors, embedding, reduced), 512, None)
    if "input side only 512" not in rows:
        measure("input side only 512", write_variant(dense, variant, tensors, reduced, embedding), 512, None)
    key = f"head-weighted 512 + mixed blocks, {args.reduction} % smaller"
    if key not in rows:
        source = write_variant(dense, args.work / "embrank-source", tensors, reduced)
        target = 1 - (args.reduction / 100 * total - saved(512)) / total
        output = args.work / "embrank-combined"
        compressed = compressed_with_spectrum(run, cli, source, output, "mixed", round(100 * (1 - target)),
                                              args.work / "embrank-pass1.npz")
        measure(key, output, 512, compressed["parameter_ratio"] - saved(512) / total, compress=compressed)
        shutil.rmtree(source, ignore_errors=True)

    print("\n" + embedding_rank_table(args.out))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
