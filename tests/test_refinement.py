"""Block refinement (compression/refinement.py): on a tiny random-weight block whose linears were made
worse on purpose, the refinement must bring its outputs nearer the dense block's, be reproducible from
its seed, never leave the block worse than it found it; and in the pipeline, change the compressed
model only when asked and resume to identical files."""
from __future__ import annotations

import json
import signal

import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.compression.refinement import output_error, refine_block, write_dense_outputs
from streamrom.model.modeling import Block, Rotary, block_class
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.stream.activations import ActivationBuffer

from helpers import cli_command, run


def tiny_block(tiny_models) -> tuple[Block, torch.Tensor, torch.Tensor]:
    reader = CheckpointReader(tiny_models["llama"])
    spec = reader.spec
    block = block_class(spec).from_tensors(spec, reader.block_tensors(1), 1)
    cos, sin = Rotary(spec).cos_sin(16)
    return block, cos, sin


def buffers(tmp_path, block: Block, sequences: int = 8, length: int = 16) -> tuple[ActivationBuffer, ActivationBuffer]:
    hidden = block.input_layernorm.weight.shape[0]
    inputs = ActivationBuffer(tmp_path / "inputs.f32", sequences, length, hidden)
    inputs.write(0, torch.randn(sequences, length, hidden, generator=torch.Generator().manual_seed(1)))
    return inputs, ActivationBuffer(tmp_path / "targets.f32", sequences, length, hidden)


def damage(block: Block, scale: float = 0.3) -> None:
    """Every linear's weight moved by noise: a stand-in for the closed-form compression's error."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter += scale * parameter.std() * torch.randn(parameter.shape, generator=generator)


def test_targets_are_the_dense_block_outputs_and_the_error_is_zero_before_any_change(tiny_models, tmp_path):
    block, cos, sin = tiny_block(tiny_models)
    inputs, targets = buffers(tmp_path, block)
    write_dense_outputs(block, inputs, targets, cos, sin, chunk_sequences=3, block_label="model.layers.1.")
    torch.testing.assert_close(targets.read(0, 8), block(inputs.read(0, 8), cos, sin), rtol=0, atol=0)
    assert output_error(block, inputs, targets, cos, sin, chunk_sequences=3) == 0.0


def test_refinement_brings_the_damaged_block_nearer_and_is_reproducible(tiny_models, tmp_path):
    block, cos, sin = tiny_block(tiny_models)
    inputs, targets = buffers(tmp_path, block)
    write_dense_outputs(block, inputs, targets, cos, sin, 4, "")
    damage(block)
    start = {name: p.clone() for name, p in block.state_dict().items()}
    result = refine_block(block, inputs, targets, cos, sin, steps=40, learning_rate=3e-3, batch_sequences=2,
                          chunk_sequences=4, seed=5)
    assert result.error_after < 0.5 * result.error_before
    assert result.error_after == pytest.approx(output_error(block, inputs, targets, cos, sin, 4), rel=1e-12)
    assert not any(p.requires_grad for p in block.parameters())
    refined = {name: p.clone() for name, p in block.state_dict().items()}

    again, _, _ = tiny_block(tiny_models)
    again.load_state_dict(start)
    refine_block(again, inputs, targets, cos, sin, steps=40, learning_rate=3e-3, batch_sequences=2,
                 chunk_sequences=4, seed=5)
    assert all(torch.equal(refined[name], p) for name, p in again.state_dict().items())  # the same seed: the same bits
    other, _, _ = tiny_block(tiny_models)
    other.load_state_dict(start)
    refine_block(other, inputs, targets, cos, sin, steps=40, learning_rate=3e-3, batch_sequences=2,
                 chunk_sequences=4, seed=6)
    assert not all(torch.equal(refined[name], p) for name, p in other.state_dict().items())


def test_a_refinement_that_makes_it_worse_is_undone(tiny_models, tmp_path):
    block, cos, sin = tiny_block(tiny_models)
    inputs, targets = buffers(tmp_path, block)
    write_dense_outputs(block, inputs, targets, cos, sin, 4, "")
    damage(block, 0.05)
    start = {name: p.clone() for name, p in block.state_dict().items()}
    result = refine_block(block, inputs, targets, cos, sin, steps=3, learning_rate=10.0, batch_sequences=2,
                          chunk_sequences=4, seed=0)  # steps far too large
    assert result.error_after == result.error_before
    assert all(torch.equal(start[name], p) for name, p in block.state_dict().items())


def config(tokens, **settings) -> CompressConfig:
    return CompressConfig(calibration=CalibrationConfig(token_file=tokens, sequences=8, seqlen=64), method="mixed",
                          allocate="spectrum", target_params=0.8, **settings)


@pytest.mark.pipeline
def test_pipeline_refines_only_when_asked(tiny_models, tiny_tokens, tmp_path):
    """--refine-steps 0 is the unrefined model bit for bit (the bit-identity fixture covers its files);
    with steps, the same plan (the same tensor names and shapes) holding other values."""
    source = tiny_models["llama"]
    streamrom.compress(source, tmp_path / "plain", config(tiny_tokens))
    streamrom.compress(source, tmp_path / "zero", config(tiny_tokens, refine_steps=0, refine_lr=1.0))
    streamrom.compress(source, tmp_path / "refined", config(tiny_tokens, refine_steps=8, refine_lr=1e-3))
    read = {label: CheckpointReader(tmp_path / label) for label in ("plain", "zero", "refined")}
    plain = {name: read["plain"].tensor(name) for name in read["plain"].weight_map}
    assert all(torch.equal(plain[name], read["zero"].tensor(name)) for name in plain)
    refined = {name: read["refined"].tensor(name) for name in read["refined"].weight_map}
    assert {name: t.shape for name, t in refined.items()} == {name: t.shape for name, t in plain.items()}
    assert not all(torch.equal(plain[name], refined[name]) for name in plain)
    report = json.loads((tmp_path / "refined" / "streamrom-report.json").read_text())
    assert report["projected_seconds"]["seconds"]["refine"] > 0 and report["stage_seconds"]["refine"] > 0


@pytest.mark.pipeline
def test_refined_run_killed_then_rerun_resumes_to_identical_files(deep_tiny, tiny_tokens, tmp_path):
    reference = tmp_path / "reference"
    assert run(cli_command(deep_tiny, reference, tiny_tokens, "--refine-steps", "4")).returncode == 0
    output = tmp_path / "out"
    killed = run(cli_command(deep_tiny, output, tiny_tokens, "--refine-steps", "4"), fault="after-block-2")
    assert killed.returncode == -signal.SIGKILL
    assert run(cli_command(deep_tiny, output, tiny_tokens, "--refine-steps", "4")).returncode == 0
    files = sorted(p.name for p in reference.glob("*.safetensors"))
    assert files and all((reference / name).read_bytes() == (output / name).read_bytes() for name in files)


@pytest.mark.pipeline
@pytest.mark.parametrize("flags", [["--refine-steps", "-1"], ["--refine-steps", "2", "--refine-lr", "0"],
                                   ["--refine-steps", "2", "--method", "svd"]])
def test_bad_refinement_settings_are_one_line(tiny_models, tiny_tokens, tmp_path, flags):
    result = run(cli_command(tiny_models["llama"], tmp_path / "out", tiny_tokens, *flags))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_memory_estimate_counts_gradients_a_mini_batch_and_the_optimiser_step():
    """Known answer at 7B shape: the refinement part is the block's gradients, pass 1's autograd part
    (the same mini-batch) and two copies of the largest linear (Adafactor's full-size temporaries)."""
    from benchmarks.scale.synthetic import config_for
    from streamrom.model.architectures import ModelSpec
    from streamrom.report.memory import estimate_compress_memory, estimated_peak

    spec = ModelSpec.from_config(config_for("7b", 2))
    common = dict(spec=spec, plan={}, source_bytes=2, chunk_tokens=2048, seqlen=512, runtime_bytes=0)
    refined = estimate_compress_memory(**common, refined=True, first_pass=True)
    plain = estimate_compress_memory(**common, first_pass=True)
    block = (3 * 4096 * 4096 + 4096 * 4096 + 3 * 11008 * 4096) * 4 + 2 * 4096 * 4  # + the two norms' gains
    assert refined["refinement"] == block + plain["pass1_autograd"] + 2 * 11008 * 4096 * 4
    assert estimated_peak(refined) == refined["block"] + refined["refinement"] > estimated_peak(plain)
