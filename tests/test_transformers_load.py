"""A compressed checkpoint loads in transformers (trust_remote_code) with the factored linears."""
from __future__ import annotations

import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig

from conftest import read_json

transformers = pytest.importorskip("transformers")


def load_in_transformers(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("kind,method", [("llama", "rom"), ("mistral", "rom"), ("qwen2", "rom-centered")])
def test_tiny_architectures_load_with_their_factors(tiny_models, tiny_tokens, tmp_path, kind, method):
    output = tmp_path / kind
    streamrom.compress(tiny_models[kind], output, CompressConfig(
        ratio=0.5, method=method, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64)))
    config = read_json(output / "config.json")
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_streamrom.Streamrom")
    model = load_in_transformers(output)
    factored = model.get_submodule("model.layers.0.mlp.down_proj")
    assert type(factored).__name__ == "LowRankLinear"
    assert factored.reduce.out_features == config["streamrom"]["ranks"]["model.layers.0.mlp.down_proj"]
    if method == "rom-centered":
        assert factored.expand.bias is not None and torch.any(factored.expand.bias != 0)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = streamrom.load(output)(ids)
        theirs = model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_real_model_generates_and_matches_streamrom_load(smollm2_dir, tmp_path):
    output = tmp_path / "rom"
    streamrom.compress(smollm2_dir, output, CompressConfig(ratio=0.6, layers="last:6",
                                                           calibration=CalibrationConfig(sequences=8, seqlen=256)))
    model = load_in_transformers(output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    prompt = tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt")
    ours = streamrom.load(output)
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits, ours(prompt["input_ids"]), atol=2e-4, rtol=1e-4)
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        # The same greedy continuation, decoded by hand with streamrom.load:
        ids = prompt["input_ids"]
        for _ in range(8):
            ids = torch.cat([ids, ours(ids)[:, -1:].argmax(-1)], dim=1)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert torch.equal(generated, ids)
    assert tokenizer.decode(generated[0, -8:]).strip()  # real text comes out
