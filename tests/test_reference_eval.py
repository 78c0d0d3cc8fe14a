"""`streamrom eval --reference` (issue 17): closeness of a compressed model to the dense one, streamed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import streamrom
from streamrom import CalibrationConfig, CompressConfig


def windows(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.pipeline
@torch.no_grad()
def test_a_model_against_itself_has_no_divergence_and_full_agreement(tiny_models, tmp_path):
    report = streamrom.evaluate(tiny_models["qwen2"], (), windows=windows(0).numpy(), chunk_tokens=48,
                                reference=tiny_models["qwen2"])
    assert report.evaluation["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    assert report.evaluation["top1_agreement"] == 1.0


@pytest.mark.pipeline
@torch.no_grad()
def test_streamed_divergence_equals_an_in_memory_computation(tiny_models, tiny_tokens, tmp_path):
    output = tmp_path / "compressed"
    streamrom.compress(tiny_models["llama"], output, CompressConfig(
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64), ratio=0.4))
    ids = windows(1)
    report = streamrom.evaluate(output, (), windows=ids.numpy(), chunk_tokens=48, reference=tiny_models["llama"])
    model = F.log_softmax(streamrom.load(output)(ids)[:, :-1], dim=-1)
    dense = F.log_softmax(streamrom.load(tiny_models["llama"])(ids)[:, :-1], dim=-1)
    kl = (dense.exp() * (dense - model)).sum(-1).mean().item()
    agreement = (model.argmax(-1) == dense.argmax(-1)).double().mean().item()
    assert kl > 1e-3  # a compressed model moved
    assert report.evaluation["mean_kl"] == pytest.approx(kl, rel=1e-4)
    assert report.evaluation["top1_agreement"] == pytest.approx(agreement, abs=1e-9)
    assert report.evaluation["reference"] == str(tiny_models["llama"])


@pytest.mark.pipeline
def test_cli_refuses_a_reference_of_another_vocabulary(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.vocab_size = 300
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", "eval", str(tiny_models["llama"]),
                             "--text", str(text), "--reference", str(other), "--report", str(tmp_path / "r.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "vocabulary" in result.stderr
    assert not (tmp_path / "r.json").exists()
