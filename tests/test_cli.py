"""Bad input through the command line: one line on stderr, a documented exit code, no traceback,
the source untouched, and nothing in the output folder that looks complete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from streamrom.cli import main
from streamrom.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE

from conftest import EVAL_TEXT, folder_digest


@pytest.fixture()
def tiny(tmp_path, tiny_models):
    """A private copy of the tiny llama, free to be damaged."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


def run_cli(capsys, args):
    code = main(["--quiet", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, expected_code, pattern, output=None, source=None, digest=None):
    """One line, the exit code, nothing complete-looking in `output`, `source` still at `digest`."""
    assert code == expected_code, err
    if source is not None:
        assert folder_digest(source) == digest, "the source folder was modified"
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamrom: error: ")
    assert pattern in lines[0]
    assert "Traceback" not in err
    if output is not None:
        assert not (output / "model.safetensors.index.json").exists()


def compress_args(source, output, tokens, *extra):
    return ["compress", source, output, "--method", "rom", "--calib-tokens", tokens, "--calib-sequences", "2",
            "--calib-seqlen", "32", *extra]


def test_missing_source_folder(capsys, tmp_path, tiny_tokens):
    code, err = run_cli(capsys, compress_args(tmp_path / "nope", tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "checkpoint folder not found", tmp_path / "out")


def test_missing_shard(capsys, tmp_path, smollm2_sharded, tiny_tokens):
    source = tmp_path / "src"
    shutil.copytree(smollm2_sharded, source)
    victim = sorted(source.glob("model-*.safetensors"))[1]
    victim.unlink()
    digest = folder_digest(source)
    code, err = run_cli(capsys, compress_args(source, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "shard listed in the index is missing", tmp_path / "out",
                         source, digest)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard(capsys, tmp_path, tiny, tiny_tokens, damage):
    shard = tiny / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\x13\x00garbage header" * 4 if damage == "garbage" else data[: len(data) // 2])
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "corrupt or unreadable shard", tmp_path / "out")
    assert folder_digest(tiny) == digest


def test_tensor_missing_from_index(capsys, tmp_path, smollm2_sharded, tiny_tokens):
    source = tmp_path / "src"
    shutil.copytree(smollm2_sharded, source)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.7.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    digest = folder_digest(source)
    code, err = run_cli(capsys, compress_args(source, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "model.layers.7.mlp.up_proj.weight is missing", tmp_path / "out",
                         source, digest)


def test_unsupported_model_type(capsys, tmp_path, tiny, tiny_tokens):
    config = json.loads((tiny / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tiny / "config.json").write_text(json.dumps(config))
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "supports gemma3_text, llama, mistral, qwen2, qwen3", tmp_path / "out",
                         tiny, digest)


def test_config_disagreeing_with_tensor_shapes(capsys, tmp_path, tiny, tiny_tokens):
    config = json.loads((tiny / "config.json").read_text())
    config["intermediate_size"] = 192
    (tiny / "config.json").write_text(json.dumps(config))
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "config.json implies", tmp_path / "out", tiny, digest)


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "nan"])
def test_ratio_outside_unit_interval(capsys, tmp_path, tiny, tiny_tokens, ratio):
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens, "--ratio", ratio))
    assert_clean_failure(code, err, EXIT_USAGE, "--ratio must be in (0, 1]", tmp_path / "out", tiny, digest)


def test_empty_calibration_text(capsys, tmp_path, smollm2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    code, err = run_cli(capsys, ["compress", smollm2_dir, tmp_path / "out", "--calib-text", empty])
    assert_clean_failure(code, err, EXIT_INPUT, "text file is empty", tmp_path / "out")


def test_too_short_calibration_text(capsys, tmp_path, smollm2_dir):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    code, err = run_cli(capsys, ["compress", smollm2_dir, tmp_path / "out", "--calib-text", short])
    assert_clean_failure(code, err, EXIT_INPUT, "calibration text too short", tmp_path / "out")


def test_missing_eval_text_fails_before_compressing(capsys, tmp_path, tiny, tiny_tokens):
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens,
                                              "--eval-text", tmp_path / "nope.txt"))
    assert_clean_failure(code, err, EXIT_INPUT, "evaluation text not found", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_equal_to_source(capsys, tiny, tiny_tokens):
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tiny, tiny_tokens))
    assert_clean_failure(code, err, EXIT_OUTPUT, "is the source folder")
    assert folder_digest(tiny) == digest


@pytest.mark.pipeline
def test_output_not_empty_without_overwrite(capsys, tmp_path, tiny, tiny_tokens):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, compress_args(tiny, output, tiny_tokens))
    assert_clean_failure(code, err, EXIT_OUTPUT, "not empty", output)
    assert (output / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, compress_args(tiny, output, tiny_tokens, "--overwrite"))
    assert code == 0, err
    assert (output / "model.safetensors.index.json").is_file() and not (output / "keep.txt").exists()


def test_pickled_checkpoint_is_refused_never_unpickled(capsys, tmp_path, tiny, tiny_tokens):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"not even a pickle")
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "never unpickles", tmp_path / "out", tiny, digest)


def test_bad_layers_and_missing_eval_text(capsys, tmp_path, tiny, tiny_tokens):
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens, "--layers", "2-9"))
    assert_clean_failure(code, err, EXIT_USAGE, "indices must be in 0..2", tmp_path / "out")
    code, err = run_cli(capsys, ["eval", tiny, "--text", tmp_path / "missing.txt"])
    assert_clean_failure(code, err, EXIT_INPUT, "no tokenizer.json")


@pytest.mark.pipeline
def test_console_script_reports_one_line(tmp_path):
    """The installed entry point itself: exit code and a single stderr line."""
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", "eval", str(tmp_path / "none"),
                             "--text", str(EVAL_TEXT)], capture_output=True, text=True)
    assert result.returncode == EXIT_INPUT
    assert result.stderr.strip().splitlines() == [f"streamrom: error: checkpoint folder not found: {tmp_path / 'none'}"]


@pytest.mark.pipeline
def test_compress_cli_writes_its_report(capsys, tmp_path, tiny_models, tiny_tokens):
    output = tmp_path / "out"
    code, err = run_cli(capsys, compress_args(tiny_models["qwen2"], output, tiny_tokens, "--ratio", "0.5"))
    assert code == 0, err
    report = json.loads((output / "streamrom-report.json").read_text())
    assert report["command"] == "compress" and 0 < report["parameter_ratio"] < 1
    assert report["memory"]["peak_rss_bytes"] > 0


def test_token_ids_beyond_the_vocabulary(capsys, tmp_path, tiny):
    import numpy as np

    tokens = tmp_path / "big.npy"
    np.save(tokens, np.arange(1000))  # the tiny model has 256 tokens
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tokens))
    assert_clean_failure(code, err, EXIT_INPUT, "outside the model's vocabulary", tmp_path / "out")


@pytest.mark.pipeline
def test_inspect_reports_ranks_parameters_and_bytes(capsys, tmp_path, tiny_models, tiny_tokens):
    output = tmp_path / "out"
    assert run_cli(capsys, compress_args(tiny_models["qwen2"], output, tiny_tokens, "--ratio", "0.5",
                                         "--layers", "1-2"))[0] == 0
    assert main(["inspect", str(output), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((output / "streamrom-report.json").read_text())
    assert summary["parameters"] == report["parameters_after"]
    assert summary["dense_parameters"] == report["parameters_before"]
    assert summary["compressed_linears"] == 14
    block0, block1 = summary["blocks"][0], summary["blocks"][1]
    assert all(m["rank"] is None for m in block0["modules"].values())
    q = block1["modules"]["self_attn.q_proj"]
    assert q["rank"] == report["ranks"]["model.layers.1.self_attn.q_proj"] == 16
    assert q["parameters"] == 16 * (64 + 64) + 16  # factors and the factored bias Vᵀb
    assert q["bytes"] == 4 * q["parameters"]
    assert q["fraction_of_dense"] == 16 * (64 + 64) / (64 * 64) and summary["near_break_even"] == []
    assert main(["inspect", str(output)]) == 0
    table = capsys.readouterr().out
    assert "whole model:" in table and "method rom" in table and "note:" not in table
    assert main(["inspect", str(tmp_path / "missing")]) == EXIT_INPUT


@pytest.mark.pipeline
def test_factored_linears_near_break_even_are_named(capsys, tmp_path, tiny_models, tiny_tokens):
    """Rank 28 of a 64 x 64 q_proj keeps 0.875 of its multiply-adds (above the measured 0.8 break-even):
    compress and inspect say so in one line; rank 24 (0.75) is not named."""
    output = tmp_path / "out"
    assert main(["compress", str(tiny_models["qwen2"]), str(output), "--calib-tokens", str(tiny_tokens),
                 "--calib-sequences", "2", "--calib-seqlen", "32", "--rank", "28", "--layers", "1",
                 "--modules", "q_proj,o_proj"]) == 0
    printed = capsys.readouterr().out
    assert "note: 2 factored linear(s) keep more than 80% of their dense parameters" in printed
    assert main(["inspect", str(output), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["near_break_even"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    assert main(["compress", str(tiny_models["qwen2"]), str(tmp_path / "lower"), "--calib-tokens", str(tiny_tokens),
                 "--calib-sequences", "2", "--calib-seqlen", "32", "--rank", "24", "--layers", "1",
                 "--modules", "q_proj,o_proj"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.pipeline
def test_package_api_is_lazy_and_callable():
    """`import streamrom` does not load torch (import-gguf starts light); the API names are the
    functions even after their modules were imported by others."""
    import subprocess
    import sys

    code = ("import sys, streamrom; assert 'torch' not in sys.modules; import streamrom.compression.pipeline; "
            "assert all(callable(getattr(streamrom, n)) for n in ('compress', 'evaluate', 'load')); "
            "assert streamrom.CompressConfig().ratio == 0.8")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.pipeline
def test_threads_bound_the_numpy_and_scipy_blas_too(tmp_path):
    """`--threads N` also caps OpenBLAS (numpy/scipy: the statistics' and eigen stages' products and
    solves) through the variables it reads when it loads, set before the command loads numpy."""
    script = ("import os, sys, streamrom.cli as cli; cli.main(sys.argv[1:]);"
              "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS'))")
    found = subprocess.run([sys.executable, "-c", script, "--threads", "1", "inspect", str(tmp_path / "missing")],
                           capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                 if not k.endswith("_NUM_THREADS")})
    assert found.stdout.split() == ["1", "1"], found.stderr


@pytest.mark.parametrize("argv,expected", [
    ([], ("mixed", "spectrum", 0.8, "pass1")),  # the recommended setting: the shortest command is the best one
    (["--target-params", "0.7"], ("mixed", "spectrum", 0.7, "pass1")),
    (["--ratio", "0.5"], ("mixed", "spectrum", None, "pass1")),  # spends what uniform at 0.5 would
    (["--allocate", "bayes"], ("mixed", "bayes", 0.8, "pass1")),
    (["--neuron-selection", "obs"], ("mixed", "spectrum", 0.8, "obs")),
    (["--method", "structured"], ("structured", "uniform", None, "obs")),  # no pass 1 to take an order from
    (["--method", "rom"], ("rom", "uniform", None, "obs")),  # an explicit method keeps uniform at --ratio 0.8
    (["--rank", "8"], ("rom", "uniform", None, "obs")),
    (["--ranks-from", "report.json"], ("rom", "uniform", None, "obs")),
    (["--ranks-from", "report.json", "--method", "mixed", "--allocate", "spectrum"], ("mixed", "spectrum", None, "obs")),
    (["--target-text", "code.txt"], ("rom", "uniform", None, "obs")),
])
def test_compress_defaults_are_the_recommended_setting(argv, expected):
    from streamrom.cli import _method_and_size, _neuron_selection, build_parser

    args = build_parser().parse_args(["compress", "src", "dst", *argv])
    method, allocate, target = _method_and_size(args)
    assert (method, allocate, target, _neuron_selection(args, allocate)) == expected


@pytest.mark.parametrize("given,message", [
    (["--refine-lr", "0.05"], "--refine-lr has no effect without --refine-steps N"),
    (["--trials", "4"], "--trials has no effect without --allocate bayes"),
    (["--study-name", "s"], "--study-name has no effect without --study"),
    (["--heartbeat", "5"], "--heartbeat has no effect without --study"),
    (["--study", "sqlite:///s.db"], "--study shares the search of --allocate bayes"),
    (["--study", "sqlite:///s.db", "--trials", "4"], "--study shares the search of --allocate bayes"),
    (["--target-weight", "0.3"], "--target-weight has no effect without --target-text"),
    (["--eval-max-windows", "3"], "--eval-max-windows has no effect without --eval-text"),
])
def test_an_option_without_the_one_it_needs_is_refused(capsys, tmp_path, tiny, tiny_tokens, given, message):
    """An option that only sets up another one, given alone, would change nothing: one line, no output."""
    digest = folder_digest(tiny)
    code, err = run_cli(capsys, compress_args(tiny, tmp_path / "out", tiny_tokens, *given))
    assert_clean_failure(code, err, EXIT_USAGE, message, tmp_path / "out", tiny, digest)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--refine-steps", "2", "--refine-lr", "0.05"],
    ["--allocate", "bayes", "--trials", "4"],
    ["--allocate", "bayes", "--study", "sqlite:///s.db", "--study-name", "s", "--heartbeat", "5"],
    ["--target-text", "code.txt", "--target-weight", "0.3"],
    ["--eval-text", "e.txt", "--eval-max-windows", "3"],
    [],  # the recommended setting: nothing given, nothing refused
])
def test_an_option_with_the_one_it_needs_is_accepted(argv):
    from streamrom.cli import _method_and_size, _without_effect, build_parser

    args = build_parser().parse_args(["compress", "src", "dst", *argv])
    assert _without_effect(args, _method_and_size(args)[1]) is None
