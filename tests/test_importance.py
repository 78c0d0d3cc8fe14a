"""The input energies compress writes beside the model (streamrom.storage.importance): per linear of the
compressed model, Σ x² over the calibration tokens of each input column, x what that linear reads in
the compressed model — llama.cpp's importance matrix (`in_sum2`, `counts`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.stream.calibration import calibration_tokens
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.errors import InputError
from streamrom.storage.importance import IMPORTANCE_FILE, read_importance


def reference_energies(folder, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The same sums from the whole compressed model in memory: a forward hook on every linear."""
    model = streamrom.load(folder, dtype=torch.float32)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for index, block in enumerate(model.layers):
        for group in block.GROUPS:
            for name in group.linears:
                key = f"model.layers.{index}.{name}"

                def hook(module, args, output, key=key):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[key] = sums.get(key, 0) + x.square().sum(0)
                hooks.append(block.linear(name).register_forward_hook(hook))
    model(torch.from_numpy(tokens.astype(np.int64)))
    for hook in hooks:
        hook.remove()
    return {key: value.numpy() for key, value in sums.items()}


@pytest.mark.pipeline
@pytest.mark.parametrize("method,settings", [("rom", {"ratio": 0.5}),
                                             ("mixed", {"allocate": "spectrum", "target_params": 0.75}),
                                             ("structured", {"ratio": 0.6})])
def test_importance_file_equals_the_sums_of_squares_of_what_each_linear_reads(tiny_models, tiny_tokens, tmp_path,
                                                                              method, settings):
    source = tiny_models["llama"]
    config = CompressConfig(method=method, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64),
                            **settings)
    output = tmp_path / "out"
    streamrom.compress(source, output, config)
    sums, tokens = read_importance(output)
    calibration = calibration_tokens(config.calibration, source, CheckpointReader(source).spec.vocab_size)
    assert tokens == calibration.size
    expected = reference_energies(output, calibration)
    assert sums.keys() == expected.keys()
    reader = CheckpointReader(output)
    for name, values in sums.items():
        stored = reader.weight_map.get(f"{name}.weight") and reader.shapes[f"{name}.weight"]
        in_features = stored[1] if stored else reader.shapes[f"{name}.reduce.weight"][1]
        assert values.shape == (in_features,), name  # the compressed linear's own input width
        np.testing.assert_allclose(values, expected[name], rtol=2e-5, atol=1e-6 * expected[name].max(), err_msg=name)
    if method == "structured":  # a narrowed MLP: down reads fewer neurons than the source's
        assert min(v.size for k, v in sums.items() if k.endswith("down_proj")) < CheckpointReader(source).spec.intermediate_size


@pytest.mark.pipeline
def test_a_method_without_calibration_writes_no_importance_file(tiny_models, tiny_tokens, tmp_path):
    output = tmp_path / "svd"
    streamrom.compress(tiny_models["llama"], output, CompressConfig(
        method="svd", ratio=0.5, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=32)))
    assert not (output / IMPORTANCE_FILE).exists()
    assert read_importance(output) is None


@pytest.mark.pipeline
def test_a_damaged_importance_file_is_one_line(tiny_models, tiny_tokens, tmp_path):
    output = tmp_path / "out"
    streamrom.compress(tiny_models["llama"], output, CompressConfig(
        ratio=0.5, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=32)))
    path = output / IMPORTANCE_FILE
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(InputError, match="cannot read"):
        read_importance(output)
