"""SentencePiece vocabularies through export-gguf, tokenized by llama.cpp itself (llama-cpp-python).

Gemma 3's vocabulary (262,144 pieces, byte fallback; the tokenizer.json that `import-gguf` made of its
package's GGUF) in three forms that a SentencePiece tokenizer.json takes: as it is (Gemma: spaces
escaped, none put before the text), with Llama 2's legacy normalizer (Prepend "▁", then spaces
escaped) and with a Metaspace pre-tokenizer (prepend_scheme "first", as newer Llama/Mistral files
write it). Each goes with a small random-weight llama (the vocabulary is what is checked; llama.cpp
needs a model to hold it) through `streamrom export-gguf`, and llama.cpp, loading the vocabulary only,
tokenizes every text: its ids against tokenizers' own (without the BOS). Texts: the six Austen novels,
the general calibration set's other texts (Carroll, Python code and docs) and a line of mixed scripts,
digits, tabs and emoji. Where they differ the first difference is shown.
llama-cpp-python: see benchmarks/gguf/in_llama_cpp.py for the build.
Results: benchmarks/results/gguf_sentencepiece.json.

    python -m benchmarks.gguf.sentencepiece
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import REPO, header, streamrom_cli



RESULTS = REPO / "benchmarks" / "results" / "gguf_sentencepiece.json"
MIXED = "Ünïcödé café 日本語のテキスト 🙂🚀 1234567 x\t\ty  z\n\n\n  indented line\n"


def texts() -> dict[str, str]:
    austen = REPO.parent / "shared" / "data" / "austen"
    if not austen.is_dir():
        austen = REPO / "data" / "austen"
    found = {path.stem: path.read_text() for path in sorted(austen.glob("*.txt"))}
    for path in sorted((REPO / "streamrom" / "data" / "general").glob("*.txt")):
        if not path.stem.startswith("austen"):
            found[path.stem] = path.read_text()
    found["mixed"] = MIXED
    return found


def variants(tokenizer: dict) -> dict[str, dict]:
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    legacy = dict(tokenizer, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, escape]}, pre_tokenizer=None)
    metaspace = dict(tokenizer, normalizer=None, pre_tokenizer={
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})
    return {"gemma (no prefix)": tokenizer, "llama 2 legacy (Prepend)": legacy, "metaspace first": metaspace}


def tiny_llama(folder: Path, tokenizer: dict, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))


def main() -> None:
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: see benchmarks/gguf/in_llama_cpp.py") from None
    from tokenizers import Tokenizer

    source = REPO / ".cache" / "bench" / "gemma3" / "tokenizer.json"
    if not source.is_file():
        raise SystemExit(f"no {source}: run benchmarks/gguf/in_llama_cpp.py --model gemma3 first (it imports Gemma 3)")
    base = json.loads(source.read_text())
    vocab_size = max(len(base["model"]["vocab"]), 1 + max(t["id"] for t in base["added_tokens"]))
    corpus = texts()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, tokenizer in variants(base).items():
            folder, path = Path(scratch) / "model", Path(scratch) / "vocab.gguf"
            tiny_llama(folder, tokenizer, vocab_size)
            subprocess.run(streamrom_cli() + ["export-gguf", str(folder), str(path), "--overwrite"], check=True,
                           cwd=REPO)
            reference = Tokenizer.from_str(json.dumps(tokenizer))
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            prefix = bool(llm.metadata.get("tokenizer.ggml.add_space_prefix") == "true")
            for label, text in corpus.items():
                ours = reference.encode(text).ids
                ours = ours[1:] if ours and ours[0] == 2 else ours
                theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
                first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                same = ours == theirs
                rows.append({"vocabulary": name, "add_space_prefix": prefix, "text": label, "characters": len(text),
                             "tokens": len(ours), "identical": same,
                             "first_difference": None if same else {
                                 "index": first, "tokenizers": ours[first:first + 4],
                                 "llama_cpp": theirs[first:first + 4],
                                 "text": reference.decode(ours[max(0, first - 3):first + 4])}})
                print(f"{name} / {label}: {len(ours)} tokens, {'identical' if same else 'DIFFERENT'}", flush=True)
            del llm
            shutil.rmtree(folder)
            path.unlink()
    RESULTS.write_text(json.dumps({"header": header("gguf.sentencepiece"), "llama_cpp_python": llama_cpp.__version__,
                                   "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    print("| vocabulary | add_space_prefix | texts | characters | tokens | identical |\n|---|---|---|---|---|---|")
    for name in variants(base):
        mine = [row for row in rows if row["vocabulary"] == name]
        print(f"| {name} | {mine[0]['add_space_prefix']} | {len(mine)} | {sum(r['characters'] for r in mine):,} | "
              f"{sum(r['tokens'] for r in mine):,} | {sum(r['identical'] for r in mine)} of {len(mine)} |")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
