"""export-gguf: checkpoints to llama.cpp's GGUF, checked by reading the file back with the gguf package
(and with our own importer, which inverts the exporter's layout), without llama.cpp itself. Gemma 3's
export (SentencePiece vocabulary, gemma3 architecture) is checked against its original GGUF in test_gemma3.py.

The real model for the dense round trip; tiny random-weight models (with a byte-level tokenizer made
here) for the structured layouts: shapes and exact functions, not accuracy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.errors import EXIT_INPUT, EXIT_OUTPUT

gguf = pytest.importorskip("gguf")

from helpers import byte_level_tokenizer, tiny_with_tokenizer as _tiny_with_tokenizer
from conftest import TINY_COMMON  # noqa: E402


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """A qwen2 (biases) and a llama without rope scaling (llama.cpp's llama needs no rope_freqs), each
    with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    root = tmp_path_factory.mktemp("export")
    sources = {}
    for kind, config in (("qwen2", Qwen2Config(**TINY_COMMON)),
                         ("llama", LlamaConfig(**TINY_COMMON, tie_word_embeddings=False))):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5)
        model.save_pretrained(root / kind)
        byte_level_tokenizer(root / kind)
        sources[kind] = root / kind
    return sources


def logits_of(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return streamrom.load(folder, dtype=torch.float32)(tokens)


def test_dense_model_round_trips_exactly(smollm2_dir, tmp_path):
    """The real model exported (f32) and imported back: every tensor, the config and the tokenizer's
    ids identical."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    result = cli("export-gguf", smollm2_dir, tmp_path / "m.gguf")
    assert result.returncode == 0, result.stderr
    assert "architecture llama" in result.stdout
    assert cli("import-gguf", tmp_path / "m.gguf", tmp_path / "back").returncode == 0
    original, back = load_file(smollm2_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], back[name], err_msg=name)
    assert json.loads((smollm2_dir / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())
    text = "It is a truth universally acknowledged, 1234 times.\n<|im_start|>user\nhi<|im_end|>"
    assert (Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
            == Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json")).encode(text).ids)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    # llama.cpp checks the embedding's rows against the token list: one entry per row, no more
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == json.loads(
        (smollm2_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.pipeline
def test_structured_model_of_one_width_is_the_same_function(tiny_sources, tiny_tokens, tmp_path):
    """Uniform structured ROM (one MLP width, values narrowed per KV head, q/k factored) of a qwen2:
    refused while factored, then exported with --densify to llama.cpp's qwen2 (values padded back),
    imported again by our importer: the same logits as the compressed checkpoint."""
    compressed = tmp_path / "structured"
    streamrom.compress(tiny_sources["qwen2"], compressed, CompressConfig(
        method="structured", ratio=0.6, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64)))
    shutil.copy(tiny_sources["qwen2"] / "tokenizer.json", compressed / "tokenizer.json")
    config = json.loads((compressed / "config.json").read_text())
    assert "layer_intermediate_sizes" not in config and config["intermediate_size"] < 160  # one narrowed width
    assert min(config["layer_value_head_dims"]) < 16
    refused = cli("export-gguf", compressed, tmp_path / "s.gguf")
    assert refused.returncode == EXIT_INPUT and "--densify" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "s.gguf").exists()
    result = cli("export-gguf", compressed, tmp_path / "s.gguf", "--densify")
    assert result.returncode == 0, result.stderr
    assert "architecture qwen2" in result.stdout and "multiplied back" in result.stdout
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    assert int(reader.fields["qwen2.feed_forward_length"].contents()) == config["intermediate_size"]
    assert cli("import-gguf", tmp_path / "s.gguf", tmp_path / "back").returncode == 0
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 24)))
    torch.testing.assert_close(logits_of(tmp_path / "back", tokens), logits_of(compressed, tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.pipeline
def test_per_block_widths_go_to_deci_with_permuted_queries_and_padded_values(tiny_sources, tiny_tokens, tmp_path):
    """Structured spectrum gives every block its own MLP width: llama.cpp's deci architecture, widths
    per block in the metadata, each tensor as llama.cpp lays it out (q/k rows permuted, values padded
    with zero rows, o_proj with zero columns), quantised where asked."""
    from streamrom.storage.checkpoint import CheckpointReader

    compressed = tmp_path / "structured"
    streamrom.compress(tiny_sources["llama"], compressed, CompressConfig(
        method="structured", allocate="spectrum", target_params=0.7,
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64)))
    shutil.copy(tiny_sources["llama"] / "tokenizer.json", compressed / "tokenizer.json")
    config = json.loads((compressed / "config.json").read_text())
    widths = config["layer_intermediate_sizes"]
    result = cli("export-gguf", compressed, tmp_path / "d.gguf", "--densify")
    assert result.returncode == 0, result.stderr
    if len(set(widths)) == 1:
        pytest.skip("the spectrum plan happened to give one width")  # not with this seed (checked below)
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert list(reader.fields["deci.feed_forward_length"].contents()) == widths
    tensors = {t.name: t for t in reader.tensors}
    stored = CheckpointReader(compressed)
    for index, width in enumerate(widths):
        gate = np.array(tensors[f"blk.{index}.ffn_gate.weight"].data)
        assert gate.shape == (width, 64)
        np.testing.assert_array_equal(gate, stored.tensor(f"model.layers.{index}.mlp.gate_proj.weight").numpy())
        values = np.array(tensors[f"blk.{index}.attn_v.weight"].data).reshape(2, 16, 64)
        kept = config.get("layer_value_head_dims", [16] * 3)[index]
        np.testing.assert_array_equal(values[:, :kept].reshape(-1, 64),
                                      stored.tensor(f"model.layers.{index}.self_attn.v_proj.weight").numpy())
        assert not values[:, kept:].any()
        output = np.array(tensors[f"blk.{index}.attn_output.weight"].data).reshape(64, 4, 16)
        assert not output[:, :, kept:].any()
    quantised = cli("export-gguf", compressed, tmp_path / "q.gguf", "--densify", "--type", "q8_0")
    assert quantised.returncode == 0, quantised.stderr
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert (tmp_path / "q.gguf").stat().st_size < 0.4 * (tmp_path / "d.gguf").stat().st_size


@pytest.mark.pipeline
@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_is_exported_as_llama_cpp_reads_it(scaling, tmp_path):
    """llama3: a rope_freqs tensor, per rotary pair the factor llama.cpp divides the frequency by, so
    that it rotates by the frequencies streamrom and transformers rotate by; linear: the scaling type
    and factor in the metadata."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from streamrom.model.architectures import ModelSpec
    from streamrom.model.modeling import rope_inverse_frequencies

    torch.manual_seed(0)
    source = tmp_path / "llama"
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_COMMON, rope_scaling=scaling)).save_pretrained(source)
    byte_level_tokenizer(source)
    result = cli("export-gguf", source, tmp_path / "m.gguf")
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    spec = ModelSpec.from_config(json.loads((source / "config.json").read_text()))
    scaled, base_theta = rope_inverse_frequencies(spec).double().numpy(), spec.rope_theta
    head_dim = spec.head_dim
    unscaled = 1.0 / base_theta ** (np.arange(0, head_dim, 2) / head_dim)
    if scaling["rope_type"] == "llama3":
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        assert factors.shape == (head_dim // 2,) and factors.min() == 1.0 and factors.max() == 8.0
        np.testing.assert_allclose(unscaled / factors, scaled, rtol=1e-6)
        assert "llama.rope.scaling.type" not in reader.fields
        # import-gguf cannot carry the factors back into a config: refused; correct only sets them aside
        refused = cli("import-gguf", tmp_path / "m.gguf", tmp_path / "back")
        assert refused.returncode == EXIT_INPUT and "rope_freqs" in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "back").exists()
        from streamrom.gguf.importer import GGUFModel
        base = GGUFModel(tmp_path / "m.gguf", derived_ok=True)
        assert base.derived == ["rope_freqs.weight"] and len(base.tensors) == len(tensors) - 1
    else:
        assert "rope_freqs.weight" not in tensors
        assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
        assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0
        np.testing.assert_allclose(unscaled / 4.0, scaled, rtol=1e-6)


@pytest.mark.pipeline
def test_bad_exports_are_refused_in_one_line(tiny_sources, tmp_path):
    target = tmp_path / "m.gguf"
    assert cli("export-gguf", tiny_sources["qwen2"], target).returncode == 0
    again = cli("export-gguf", tiny_sources["qwen2"], target)
    assert again.returncode == EXIT_OUTPUT and "--overwrite" in again.stderr and len(again.stderr.splitlines()) == 1
    assert cli("export-gguf", tiny_sources["qwen2"], target, "--overwrite").returncode == 0
    nowhere = cli("export-gguf", tiny_sources["qwen2"], tmp_path / "no-such-folder" / "m.gguf")
    assert nowhere.returncode == EXIT_OUTPUT and "does not exist" in nowhere.stderr, nowhere.stderr
    assert len(nowhere.stderr.splitlines()) == 1  # said before the writer logs anything
    without = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_sources["qwen2"], without)
    (without / "tokenizer.json").unlink()
    refused = cli("export-gguf", without, tmp_path / "n.gguf")
    assert refused.returncode == EXIT_INPUT and "tokenizer.json" in refused.stderr
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "n.gguf").exists()


def sentencepiece_tokenizer_json(folder: Path, normalizer=None, pre_tokenizer=None) -> None:
    """A Llama-2-style tokenizer.json: BPE with byte fallback, <unk> <s> </s> as special added tokens,
    the 256 byte tokens <0xNN>, and a few pieces built by merges."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for piece in ("▁", "t", "h", "e", "▁t", "he", "▁the"):
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "t"), ("h", "e"), ("▁t", "he")],
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer if normalizer is not None else normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in ("<unk>", "<s>", "</s>")])
    tokenizer.save(str(folder / "tokenizer.json"))


def test_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(tmp_path):
    """A byte-fallback BPE tokenizer.json becomes llama.cpp's "llama" vocabulary: byte tokens typed
    BYTE (llama.cpp falls back to them by their <0xNN> text), special tokens CONTROL; scores price the
    merges (-id; bytes 0, control -1000); the space prefix read off each form that writes one."""
    from tokenizers import normalizers, pre_tokenizers

    from streamrom.model.architectures import ModelSpec
    from streamrom.errors import InputError
    from streamrom.gguf.exporter import _tokenizer_metadata, sentencepiece_space_prefix

    sentencepiece_tokenizer_json(tmp_path)
    spec = ModelSpec.from_config({"model_type": "llama", **TINY_COMMON, "vocab_size": 266})
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    _tokenizer_metadata(writer, tmp_path, spec, {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "v.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(tokens) == 266 and tokens[3] == "<0x00>" and tokens[265] == "▁the"
    assert fields["tokenizer.ggml.token_type"].contents() == [3, 3, 3] + [6] * 256 + [1] * 7
    assert fields["tokenizer.ggml.scores"].contents() == [-1000.0] * 3 + [0.0] * 256 + [-float(i) for i in range(259, 266)]
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1

    def prefix(normalizer=None, pre_tokenizer=None) -> bool:
        sentencepiece_tokenizer_json(tmp_path, normalizer, pre_tokenizer)
        return sentencepiece_space_prefix(json.loads((tmp_path / "tokenizer.json").read_text()))

    assert prefix(normalizers.Replace(" ", "▁")) is False  # Gemma's: spaces escaped, none put before
    assert prefix(normalizers.Sequence([]), pre_tokenizers.Metaspace(prepend_scheme="first")) is True
    assert prefix(normalizers.Sequence([]), pre_tokenizers.Metaspace(prepend_scheme="never")) is False
    with pytest.raises(InputError, match="does not write spaces"):
        prefix(normalizers.Sequence([]))


@pytest.mark.pipeline
def test_per_block_widths_of_a_qwen2_are_padded_to_the_widest(tiny_sources, tiny_tokens, tmp_path):
    """llama.cpp's qwen2 has one MLP width: a structured-spectrum qwen2 (its own width per block) is
    written with zero neurons up to the widest block's, and imported back it computes the compressed
    checkpoint's logits."""
    compressed = tmp_path / "structured"
    streamrom.compress(tiny_sources["qwen2"], compressed, CompressConfig(
        method="structured", allocate="spectrum", target_params=0.7,
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64)))
    shutil.copy(tiny_sources["qwen2"] / "tokenizer.json", compressed / "tokenizer.json")
    widths = json.loads((compressed / "config.json").read_text())["layer_intermediate_sizes"]
    assert len(set(widths)) > 1
    result = cli("export-gguf", compressed, tmp_path / "p.gguf", "--densify")
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(tmp_path / "p.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.feed_forward_length"].contents() == max(widths)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    for index, width in enumerate(widths):
        assert tensors[f"blk.{index}.ffn_up.weight"].shape == (max(widths), 64)
        assert not tensors[f"blk.{index}.ffn_up.weight"][width:].any()
        assert not tensors[f"blk.{index}.ffn_down.weight"][:, width:].any()
    assert cli("import-gguf", tmp_path / "p.gguf", tmp_path / "back").returncode == 0
    tokens = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(2, 24)))
    torch.testing.assert_close(logits_of(tmp_path / "back", tokens), logits_of(compressed, tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.pipeline
def test_gemma3_with_its_own_widths_and_layer_pattern_round_trips(tiny_tokens, tmp_path):
    """A tiny Gemma 3 whose sliding/full blocks are not llama.cpp's every-6th guess, structured with its
    own MLP width per block: exported as llama.cpp's gemma3 (norms as 1 + w, the pattern and the local
    rope base written, MLPs padded to the widest, values padded), imported again it computes the
    compressed checkpoint's logits. A query scale llama.cpp's gemma3 does not use is refused."""
    from conftest import make_tiny

    scaled = make_tiny(tmp_path / "scaled", "gemma3_text")  # its own query scale (query_pre_attn_scalar 24)
    byte_level_tokenizer(scaled)
    source = tmp_path / "gemma"
    shutil.copytree(scaled, source)
    settings = json.loads((source / "config.json").read_text())
    # llama.cpp's gemma3 scales queries by 1/√head_dim
    (source / "config.json").write_text(json.dumps({**settings, "query_pre_attn_scalar": settings["head_dim"]}))
    compressed = tmp_path / "structured"
    # q/k left dense: densified centered factors carry biases that HF's Gemma 3 has no slot for on import
    streamrom.compress(source, compressed, CompressConfig(
        method="structured", allocate="spectrum", target_params=0.85,
        modules=("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64)))
    shutil.copy(source / "tokenizer.json", compressed / "tokenizer.json")
    widths = json.loads((compressed / "config.json").read_text()).get("layer_intermediate_sizes")
    assert widths and len(set(widths)) > 1
    result = cli("export-gguf", compressed, tmp_path / "g.gguf")
    assert result.returncode == 0, result.stderr
    fields = gguf.GGUFReader(tmp_path / "g.gguf").fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False, True]
    assert fields["gemma3.rope.freq_base_swa"].contents() == 10000.0
    assert fields["gemma3.feed_forward_length"].contents() == max(widths)
    assert cli("import-gguf", tmp_path / "g.gguf", tmp_path / "back").returncode == 0
    tokens = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(2, 40)))  # past the window of 16
    torch.testing.assert_close(logits_of(tmp_path / "back", tokens), logits_of(compressed, tokens),
                               rtol=1e-4, atol=1e-4)
    refused = cli("export-gguf", scaled, tmp_path / "s.gguf")
    assert refused.returncode == EXIT_INPUT and "scales queries" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "s.gguf").exists()


# -- llama.cpp's own quantizer (issue 34 item 2); the quantized file itself in benchmarks/quantization/frontier.py ------
def _llama_quantize():
    import shutil

    found = os.environ.get("STREAMROM_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    return found if found and os.access(found, os.X_OK) else None


@pytest.mark.pipeline
@pytest.mark.parametrize("case", ["not installed", "not executable", "imatrix with a streamrom type",
                                  "imatrix that is not one"])
def test_llama_quantize_types_refused_in_one_line(tmp_path, case):
    source = _tiny_with_tokenizer(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "STREAMROM_LLAMA_QUANTIZE"}
    env["PATH"] = "/usr/bin:/bin"  # no llama-quantize there
    output = tmp_path / "out.gguf"
    extra = {"not installed": ["--type", "q4_k_m"],
             "not executable": ["--type", "q3_k_m", "--llama-quantize", str(tmp_path / "README")],
             "imatrix with a streamrom type": ["--type", "q8_0", "--imatrix", str(tmp_path / "m.gguf")],
             "imatrix that is not one": ["--type", "q2_k", "--llama-quantize", sys.executable,
                                         "--imatrix", str(source / "config.json")]}[case]
    (tmp_path / "README").write_text("not a program")
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", "export-gguf", str(source), str(output), *extra],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == (3 if case == "imatrix that is not one" else 2), result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("streamrom: error:")
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.pipeline
@pytest.mark.skipif(_llama_quantize() is None, reason="llama.cpp's llama-quantize is not installed "
                                                      "(set STREAMROM_LLAMA_QUANTIZE; docs/gguf.md)")
def test_llama_quantize_makes_k_quants(tmp_path):
    import gguf

    source = _tiny_with_tokenizer(tmp_path, hidden=256)
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", "export-gguf", str(source),
                             str(tmp_path / "out.gguf"), "--type", "q4_k_m", "--llama-quantize", _llama_quantize()],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K") and kinds["blk.0.attn_norm.weight"] == "F32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _compressed_with_tokenizer(tmp_path: Path, hidden: int = 64) -> Path:
    """The tiny llama with a tokenizer, compressed by structured ROM (narrower MLPs and value heads)."""
    source = _tiny_with_tokenizer(tmp_path, hidden=hidden)
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, TINY_COMMON["vocab_size"], size=4096))
    streamrom.compress(source, tmp_path / "small", streamrom.CompressConfig(
        method="structured", ratio=0.6, calibration=streamrom.CalibrationConfig(token_file=tokens, sequences=8,
                                                                                 seqlen=64)))
    return tmp_path / "small"


@pytest.mark.pipeline
def test_the_checkpoints_input_energies_become_llama_cpps_importance_matrix(tmp_path):
    """write_llama_imatrix: a GGUF of general.type "imatrix" with, per block linear, `in_sum2` laid out as
    the exported matrix's columns (the narrowed heads and MLP padded back with zeros, as the weights
    are) and `counts` the calibration tokens."""
    import gguf

    from streamrom.gguf.exporter import check_imatrix, write_llama_imatrix
    from streamrom.storage.importance import read_importance

    compressed = _compressed_with_tokenizer(tmp_path)
    spec = CheckpointReader(compressed).spec
    assert spec.layer_value_head_dims or spec.layer_intermediate_sizes or spec.intermediate_size < 160
    assert cli("export-gguf", compressed, tmp_path / "m.gguf", "--type", "f32", "--densify").returncode == 0
    columns = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}  # ne0: the input
    assert write_llama_imatrix(compressed, tmp_path / "m.imatrix.gguf", densify=True)
    check_imatrix(tmp_path / "m.imatrix.gguf")
    matrix = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "m.imatrix.gguf").tensors}
    sums, tokens = read_importance(compressed)
    names = {f"blk.{i}.{short}.weight": f"model.layers.{i}.{hf}" for i in range(spec.num_layers)
             for short, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                               ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                               ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"))}
    assert set(matrix) == {f"{n}.{part}" for n in names for part in ("in_sum2", "counts")}
    padded = 0
    for gguf_name, hf in names.items():
        energies = matrix[f"{gguf_name}.in_sum2"]
        assert energies.size == columns[gguf_name], gguf_name
        assert matrix[f"{gguf_name}.counts"].tolist() == [tokens]
        np.testing.assert_allclose(np.sort(energies[energies > 0]), np.sort(sums[hf][sums[hf] > 0]), rtol=1e-6)
        padded += energies.size - sums[hf].size
    assert padded > 0  # something was narrowed, so the layout was tested
    assert not write_llama_imatrix(_tiny_with_tokenizer(tmp_path / "dense"), tmp_path / "none.gguf", densify=False)

    # a vector of another length than the columns its linear reads (a damaged or foreign file) is said
    # here, not by llama-quantize failing on the model
    from safetensors.numpy import save_file
    from safetensors import safe_open

    from streamrom.errors import InputError
    from streamrom.storage.importance import IMPORTANCE_FILE

    with safe_open(compressed / IMPORTANCE_FILE, "np") as stored:
        metadata = stored.metadata()
    short = {f"{k}.in_sum2": (v[: v.size // 2] if k.endswith("gate_proj") else v) for k, v in sums.items()}
    save_file(short, compressed / IMPORTANCE_FILE, metadata=metadata)
    with pytest.raises(InputError, match=r"holds \d+ energies for model\.layers\.0\.mlp\.gate_proj, which reads"):
        write_llama_imatrix(compressed, tmp_path / "short.imatrix.gguf", densify=True)


@pytest.mark.pipeline
@pytest.mark.skipif(_llama_quantize() is None, reason="llama.cpp's llama-quantize is not installed "
                                                      "(set STREAMROM_LLAMA_QUANTIZE; docs/gguf.md)")
def test_llama_quantize_is_handed_the_checkpoints_own_importance_matrix(tmp_path):
    compressed = _compressed_with_tokenizer(tmp_path, hidden=256)
    files = {}
    for label, extra in (("own", []), ("none", ["--no-imatrix"])):
        files[label] = tmp_path / f"{label}.gguf"
        result = subprocess.run([sys.executable, "-m", "streamrom.cli", "export-gguf", str(compressed),
                                 str(files[label]), "--type", "q2_k", "--llama-quantize", _llama_quantize(), "--densify", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert ("checkpoint's own importance matrix" in result.stdout) == (label == "own"), result.stdout
    assert files["own"].read_bytes() != files["none"].read_bytes()  # the matrix weighed the rounding
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".own", ".none"))]
    both = subprocess.run([sys.executable, "-m", "streamrom.cli", "export-gguf", str(compressed),
                           str(tmp_path / "x.gguf"), "--type", "q2_k", "--llama-quantize", _llama_quantize(),
                           "--densify", "--no-imatrix", "--imatrix", str(tmp_path / "own.gguf")], capture_output=True, text=True)
    assert both.returncode == 2 and len(both.stderr.splitlines()) == 1


@pytest.mark.pipeline
def test_gemma3_biases_are_refused_and_no_bias_fits_export(tiny_tokens, tmp_path):
    """llama.cpp's gemma3 graph loads no bias tensors (a file with one fails to load there): a centered
    fit's mean-correction biases are refused in one line, naming the cure; `--no-bias` fits the
    uncentered moments, writes no bias, and its densified export imports back to the same logits."""
    from conftest import make_tiny

    source = make_tiny(tmp_path / "gemma", "gemma3_text")
    byte_level_tokenizer(source)
    settings = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**settings, "query_pre_attn_scalar": settings["head_dim"]}))
    calibration = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=32)
    assert not CompressConfig(method="mixed", mean_bias=False).compression_method.centered
    for name, mean_bias in (("biased", True), ("unbiased", False)):
        streamrom.compress(source, tmp_path / name, CompressConfig(
            method="rom-centered", ratio=0.5, mean_bias=mean_bias, calibration=calibration))
        shutil.copy(source / "tokenizer.json", tmp_path / name / "tokenizer.json")
    biased = [n for n in CheckpointReader(tmp_path / "biased").weight_map if n.endswith("bias")]
    assert biased and not [n for n in CheckpointReader(tmp_path / "unbiased").weight_map if n.endswith("bias")]
    refused = cli("export-gguf", tmp_path / "biased", tmp_path / "b.gguf", "--densify")
    assert refused.returncode == EXIT_INPUT and "--no-bias" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "b.gguf").exists()
    result = cli("export-gguf", tmp_path / "unbiased", tmp_path / "u.gguf", "--densify")
    assert result.returncode == 0, result.stderr
    assert not [t.name for t in gguf.GGUFReader(tmp_path / "u.gguf").tensors if t.name.endswith("bias")]
    assert cli("import-gguf", tmp_path / "u.gguf", tmp_path / "back").returncode == 0
    tokens = torch.from_numpy(np.random.default_rng(4).integers(0, 256, size=(2, 24)))
    torch.testing.assert_close(logits_of(tmp_path / "back", tokens), logits_of(tmp_path / "unbiased", tokens),
                               rtol=1e-4, atol=1e-4)


# -- low-rank corrections of the quantization error, as a llama.cpp LoRA adapter (issue 34 item 3) ----------
def _calibration_arguments(tiny_tokens) -> list:
    return ["--calib-tokens", tiny_tokens, "--calib-sequences", "4", "--calib-seqlen", "32"]


@pytest.fixture(scope="module")
def quantized_tiny(tiny_sources, tmp_path_factory) -> Path:
    """The tiny llama exported as q4_0 (streamrom's own quantizer: no llama.cpp needed)."""
    base = tmp_path_factory.mktemp("quantized") / "q.gguf"
    assert cli("export-gguf", tiny_sources["llama"], base, "--type", "q4_0").returncode == 0
    return base


@pytest.mark.pipeline
def test_full_rank_correction_restores_the_dense_matrices_in_llama_cpp_and_in_transformers(
        tiny_sources, tiny_tokens, quantized_tiny, tmp_path):
    """At full rank each linear's correction is its whole quantization error. In the GGUF adapter: the
    base's dequantized matrix plus lora_b·lora_a is the dense matrix exactly as the f32 export lays it
    out (llama's q/k rows permuted), so its names, shapes and layout are the ones llama.cpp adds to the
    base's. In the PEFT adapter (`--peft`, Hugging Face's row order): added to the base as transformers
    reads it (imported, dequantized), it gives the logits of the base with the source's block matrices
    put back (the embedding and head stay quantized: no correction is fitted to them); with peft
    installed, PEFT itself loads and applies it the same."""
    from gguf.quants import dequantize
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    source = tiny_sources["llama"]
    assert cli("export-gguf", source, tmp_path / "f.gguf", "--type", "f32").returncode == 0
    result = cli("correct", source, quantized_tiny, tmp_path / "a.gguf", "--rank", "100000", "--adapter-type",
                 "f32", "--peft", tmp_path / "peft", *_calibration_arguments(tiny_tokens), "--report", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    adapter = gguf.GGUFReader(tmp_path / "a.gguf")
    assert adapter.fields["general.type"].contents() == "adapter"
    assert adapter.fields["adapter.type"].contents() == "lora"
    assert adapter.fields["general.architecture"].contents() == "llama"
    factors = {t.name: np.array(t.data) for t in adapter.tensors}
    dense = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    linears = [t for t in gguf.GGUFReader(quantized_tiny).tensors
               if t.name.startswith("blk.") and not t.name.endswith("norm.weight")]
    assert len(factors) == 2 * len(linears) and len(linears) == 7 * TINY_COMMON["num_hidden_layers"]
    for tensor in linears:
        quantized = dequantize(np.array(tensor.data), tensor.tensor_type).reshape(dense[tensor.name].shape)
        assert np.abs(dense[tensor.name] - quantized).max() > 1e-3  # q4_0 moved it
        restored = quantized + factors[f"{tensor.name}.lora_b"] @ factors[f"{tensor.name}.lora_a"]
        np.testing.assert_allclose(restored, dense[tensor.name], rtol=0, atol=2e-4 * np.abs(dense[tensor.name]).max())
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["linears"] == len(linears) and report["error_removed"]["min"] > 0.999

    settings = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["lora_alpha"] == settings["r"]
    assert cli("import-gguf", quantized_tiny, tmp_path / "base").returncode == 0
    tokens = torch.from_numpy(np.random.default_rng(5).integers(0, 256, size=(2, 24)))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(source).state_dict()
        restored = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        for name, module in restored.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(original[f"{name}.weight"])
        expected = restored(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        assert (base(tokens).logits - expected).abs().max() > 1e-3
        peft_factors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        for key, down in peft_factors.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                module = base.get_submodule(name)
                scale = settings["alpha_pattern"].get(name, settings["lora_alpha"]) / settings["rank_pattern"].get(
                    name, settings["r"])
                assert down.shape[0] == min(module.weight.shape) and scale == 1.0
                module.weight += torch.from_numpy(peft_factors[key.replace("lora_A", "lora_B")] @ down)
        torch.testing.assert_close(base(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    try:  # PEFT is no dependency of streamrom's: where it is installed, it reads the folder the same
        import peft
    except ImportError:
        return
    with torch.no_grad():
        wrapped = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                 tmp_path / "peft").eval()
        torch.testing.assert_close(wrapped(tokens).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.pipeline
def test_a_low_rank_correction_removes_part_of_the_error_and_bad_input_is_refused(tiny_sources, tiny_tokens,
                                                                                    quantized_tiny, tmp_path):
    """At rank 2 the correction removes some but not all of each linear's input-weighted error; a
    base of another model, a missing base, an existing output are refused in one line, nothing written."""
    source = tiny_sources["llama"]
    result = cli("correct", source, quantized_tiny, tmp_path / "a.gguf", "--rank", "2",
                 *_calibration_arguments(tiny_tokens), "--report", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    removed = json.loads((tmp_path / "a.json").read_text())["error_removed"]
    assert 0 < removed["min"] <= removed["mean"] < 0.9
    assert {t.data.shape[0] for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors if t.name.endswith("lora_a")} == {2}
    assert cli("export-gguf", tiny_sources["qwen2"], tmp_path / "other.gguf", "--type", "q4_0").returncode == 0
    for base, output, code, said in ((tmp_path / "other.gguf", tmp_path / "b.gguf", EXIT_INPUT, "qwen2"),
                                     (tmp_path / "none.gguf", tmp_path / "b.gguf", EXIT_INPUT, "not found"),
                                     (quantized_tiny, tmp_path / "a.gguf", EXIT_OUTPUT, "--overwrite")):
        refused = cli("correct", source, base, output, *_calibration_arguments(tiny_tokens))
        assert refused.returncode == code and said in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    both = cli("correct", source, quantized_tiny, tmp_path / "b.gguf", "--adapter-size", "1", "--rank", "8")
    assert both.returncode == 2
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.pipeline
def test_an_adapter_size_spreads_ranks_by_the_loss_they_save_within_its_bytes(tiny_sources, tiny_tokens,
                                                                              quantized_tiny, tmp_path):
    """`--adapter-size MIB`: pass 1 prices every direction of every linear's error; the ranks differ per
    linear, and the adapter's matrices fit the budget (f16: two bytes a parameter)."""
    budget_mib = 0.02
    result = cli("correct", tiny_sources["llama"], quantized_tiny, tmp_path / "a.gguf", "--adapter-size",
                 str(budget_mib), *_calibration_arguments(tiny_tokens), "--report", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    ranks = report["ranks"]
    assert len(set(ranks.values())) > 1 and len(ranks) == 7 * TINY_COMMON["num_hidden_layers"]
    assert 0 < 2 * report["adapter_parameters"] <= budget_mib * 2**20
    tensors = {t.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert len(tensors) == 2 * sum(rank > 0 for rank in ranks.values())


@pytest.mark.pipeline
def test_given_ranks_are_the_adapters_and_ranks_that_do_not_fit_are_refused(tiny_sources, tiny_tokens,
                                                                           quantized_tiny, tmp_path):
    """CorrectionConfig.ranks (what export-gguf --target-size chose): each linear's correction of exactly its
    rank, none where it is 0; a linear left out, one unknown or a rank above min(out, in): UsageError, nothing
    written."""
    from streamrom.errors import UsageError
    from streamrom.gguf.correction import CorrectionConfig, correct
    from streamrom.model.architectures import BLOCK_LINEARS, block_prefix

    names = [f"{block_prefix(i)}{linear}" for i in range(TINY_COMMON["num_hidden_layers"]) for linear in BLOCK_LINEARS]
    ranks = {name: (0, 2, 4)[k % 3] for k, name in enumerate(names)}
    calibration = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=32)
    summary = correct(tiny_sources["llama"], quantized_tiny, tmp_path / "a.gguf",
                      CorrectionConfig(ranks=ranks, calibration=calibration))
    assert summary["ranks"] == ranks
    found = {t.name: t.data.shape[0] for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors if t.name.endswith("lora_a")}
    assert sorted(found.values()) == sorted(r for r in ranks.values() if r)
    for bad in ({k: v for k, v in ranks.items() if k != names[0]}, {**ranks, "model.layers.9.mlp.up_proj": 2},
                {**ranks, names[0]: 10**6}):
        with pytest.raises(UsageError):
            correct(tiny_sources["llama"], quantized_tiny, tmp_path / "b.gguf", CorrectionConfig(ranks=bad,
                                                                                                 calibration=calibration))
        assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.pipeline
def test_anchored_corrections_are_fitted_on_a_dense_stream_and_off_is_the_plain_fit(tiny_sources, tiny_tokens,
                                                                                       quantized_tiny, tmp_path):
    """`--anchor 0` writes the plain fit's adapter byte for byte; `--anchor` (a dense stream beside the
    corrected one, each correction fitted toward the dense model's outputs) writes another of the same
    tensors and shapes. Whether anchoring pays is measured on a real model (docs/gguf.md): on this tiny
    random one it need not."""
    source = tiny_sources["llama"]
    for name, anchor in (("plain", []), ("off", ["--anchor", "0"]), ("anchored", ["--anchor"])):
        result = cli("correct", source, quantized_tiny, tmp_path / f"{name}.gguf", "--rank", "8",
                     *anchor, *_calibration_arguments(tiny_tokens))
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "off.gguf").read_bytes()
    plain = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}
    anchored = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "anchored.gguf").tensors}
    assert {n: a.shape for n, a in plain.items()} == {n: a.shape for n, a in anchored.items()}
    assert any(not np.allclose(plain[n], anchored[n], atol=1e-3) for n in plain)
    assert np.all([np.isfinite(a).all() for a in anchored.values()])
    assert not list(tmp_path.glob(".*"))
