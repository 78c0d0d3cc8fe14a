"""Nightly-run reliability: kills and resume, determinism, locks, faults, up-front checks, fuzzing.

Streaming tests on tiny random-weight models (shapes, files and control flow, not accuracy)."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.cli import main
from streamrom.errors import (EXIT_BUSY, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_RESOURCES,
                              ResourceError, StreamromError)
from streamrom.compression.progress import LOCK_FILE, PROGRESS_FILE, OutputLock

from helpers import cli_command, default_sigint, limit_file_size, model_files, run
from conftest import folder_digest, make_tiny

def test_same_command_gives_bit_identical_files(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "again"
    assert run(cli_command(deep_tiny, output, tiny_tokens)).returncode == 0
    assert model_files(output) == reference


@pytest.mark.parametrize("point", ["after-block-0", "during-block-2", "writing-block-3", "after-block-4",
                                   "writing-block-5"])
def test_sigkill_then_rerun_resumes_to_identical_files(deep_tiny, tiny_tokens, tmp_path, reference, point):
    output = tmp_path / "out"
    source_digest = folder_digest(deep_tiny)
    killed = run(cli_command(deep_tiny, output, tiny_tokens), fault=point)
    assert killed.returncode == -signal.SIGKILL
    assert not (output / "model.safetensors.index.json").exists(), "a killed run must look unfinished"
    progress = json.loads((output / PROGRESS_FILE).read_text())
    resumed = run(cli_command(deep_tiny, output, tiny_tokens, "--report", str(tmp_path / "r.json")))
    assert resumed.returncode == 0, resumed.stderr
    assert model_files(output) == reference
    assert folder_digest(deep_tiny) == source_digest
    # It really resumed: blocks finished before the kill were not redone.
    assert progress["blocks_done"] >= 1
    log = run(cli_command(deep_tiny, tmp_path / "fresh", tiny_tokens))
    assert log.returncode == 0


@pytest.mark.parametrize("name", [PROGRESS_FILE, "config.json", "model.safetensors.index.json",
                                  "streamrom-report.json"])
def test_killed_between_a_file_and_its_rename_then_rerun_is_identical(deep_tiny, tiny_tokens, tmp_path, reference,
                                                                      name):
    """Killed with a file's temporary on disk and not yet renamed into place (write_atomic). The first
    progress record is the case the long kill sweep found under load: the folder then holds only that
    temporary and the lock, both the run's own, and the rerun must start afresh, not refuse a folder
    that is not empty."""
    output = tmp_path / "out"
    killed = run(cli_command(deep_tiny, output, tiny_tokens), fault=f"replacing-{name}")
    assert killed.returncode == -signal.SIGKILL
    assert (output / f".{name}.tmp").is_file()
    if name == PROGRESS_FILE:
        assert sorted(p.name for p in output.iterdir()) == [f".{PROGRESS_FILE}.tmp", LOCK_FILE]
    again = run(cli_command(deep_tiny, output, tiny_tokens))
    assert again.returncode == 0, again.stderr
    assert model_files(output) == reference
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == []


def test_resume_is_logged_and_skips_finished_blocks(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "out"
    assert run(cli_command(deep_tiny, output, tiny_tokens), fault="after-block-3").returncode == -signal.SIGKILL
    command = cli_command(deep_tiny, output, tiny_tokens)
    command.remove("--quiet")
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after block 4" in resumed.stderr
    assert "block 1/6 done" not in resumed.stderr and "block 5/6 done" in resumed.stderr
    assert model_files(output) == reference


def test_ctrl_c_stops_cleanly_and_resumes(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "out"
    stopped = run(cli_command(deep_tiny, output, tiny_tokens), fault="sigint:during-block-2", preexec=default_sigint)
    assert stopped.returncode == EXIT_INTERRUPTED
    assert stopped.stderr.strip().splitlines() == ["streamrom: interrupted (rerun the same command to resume)"]
    assert not (output / "model.safetensors.index.json").exists()
    assert run(cli_command(deep_tiny, output, tiny_tokens)).returncode == 0
    assert model_files(output) == reference


def test_other_arguments_or_source_are_refused_then_overwrite_starts_over(deep_tiny, tiny_tokens, tmp_path,
                                                                         reference):
    output = tmp_path / "out"
    assert run(cli_command(deep_tiny, output, tiny_tokens), fault="after-block-1").returncode == -signal.SIGKILL
    other = cli_command(deep_tiny, output, tiny_tokens)
    other[other.index("--ratio") + 1] = "0.4"
    refused = run(other)
    assert refused.returncode == EXIT_OUTPUT
    assert "unfinished run with other arguments" in refused.stderr and len(refused.stderr.splitlines()) == 1
    changed = tmp_path / "changed"
    shutil.copytree(deep_tiny, changed)
    state = load_file(changed / "model.safetensors")
    state["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"][:32].repeat(2)
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    changed_config = json.loads((changed / "config.json").read_text())
    changed_config["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(changed_config))
    refused = run(cli_command(changed, output, tiny_tokens))
    assert refused.returncode == EXIT_OUTPUT and "different source" in refused.stderr
    assert run(cli_command(deep_tiny, output, tiny_tokens, "--overwrite")).returncode == 0
    assert model_files(output) == reference


def test_second_run_on_the_same_output_is_locked_out(deep_tiny, tiny_tokens, tmp_path):
    output = tmp_path / "out"
    with OutputLock(output):
        busy = run(cli_command(deep_tiny, output, tiny_tokens))
    assert busy.returncode == EXIT_BUSY
    assert "another streamrom run is writing" in busy.stderr and len(busy.stderr.splitlines()) == 1
    assert run(cli_command(deep_tiny, output, tiny_tokens)).returncode == 0


def test_failing_writes_give_one_line_and_resume_afterwards(deep_tiny, tiny_tokens, tmp_path, reference):
    """Disk full, simulated at the OS level: the process may write no file larger than 60 kB."""
    output = tmp_path / "out"
    digest = folder_digest(deep_tiny)
    full = run(cli_command(deep_tiny, output, tiny_tokens), preexec=limit_file_size(60_000))
    assert full.returncode == EXIT_RESOURCES, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left writing" in lines[0]
    assert not (output / "model.safetensors.index.json").exists()
    assert folder_digest(deep_tiny) == digest
    assert run(cli_command(deep_tiny, output, tiny_tokens)).returncode == 0
    assert model_files(output) == reference


def test_up_front_disk_check_names_the_numbers(deep_tiny, tiny_tokens, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("streamrom.storage.layout.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    config = CompressConfig(calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64))
    with pytest.raises(ResourceError, match=r"not enough free disk space .* need 0\.\d+ GiB \(output .* activations"):
        streamrom.compress(deep_tiny, tmp_path / "out", config)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_up_front_memory_check(deep_tiny, tiny_tokens, tmp_path, monkeypatch):
    class Tiny:
        available = 1000
    monkeypatch.setattr("streamrom.compression.pipeline.psutil.virtual_memory", lambda: Tiny())
    config = CompressConfig(calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64))
    with pytest.raises(ResourceError, match="not enough memory: the run needs about"):
        streamrom.compress(deep_tiny, tmp_path / "out", config)


@pytest.mark.parametrize("where", ["weights", "activations"])
def test_nan_or_inf_is_refused(tmp_path, tiny_tokens, capsys, where):
    source = make_tiny(tmp_path / "src", "llama")
    state = load_file(source / "model.safetensors")
    if where == "weights":
        state["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    else:  # finite weights whose activations overflow float32: gate·up of ~1e37 each is Inf
        state["model.layers.1.post_attention_layernorm.weight"].fill_(3e38)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    digest = folder_digest(source)
    capsys.readouterr()  # drop what building the model printed
    code = main(["--quiet", "compress", str(source), str(tmp_path / "out"), "--method", "rom", "--calib-tokens",
                 str(tiny_tokens), "--calib-sequences", "4", "--calib-seqlen", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT and len(err) == 1
    assert ("v_proj.weight" in err[0] and "NaN or Inf" in err[0]) if where == "weights" else "NaN or Inf activations" in err[0]
    assert folder_digest(source) == digest
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def _mutations(rng: random.Random, data: bytes, count: int):
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(count):
        kind = rng.choice(["truncate", "flip", "flip-length", "truncate-header"])
        if kind == "truncate":
            yield data[: rng.randrange(0, len(data))]
        elif kind == "truncate-header":
            yield data[: rng.randrange(0, header_end)]
        elif kind == "flip-length":
            mutated = bytearray(data)
            mutated[rng.randrange(0, 8)] ^= 1 << rng.randrange(8)
            yield bytes(mutated)
        else:
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(8, header_end)] ^= 1 << rng.randrange(8)
            yield bytes(mutated)


class _Timeout(Exception):
    pass


def _read_within(folder: Path, seconds: int = 20) -> None:
    """Open and read a checkpoint; fail the test on a hang or on anything but a StreamromError."""
    def on_alarm(signum, frame):
        raise _Timeout()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        reader = CheckpointReader(folder)
        reader.block_tensors(0)
        reader.tensor("model.embed_tokens.weight")
    except StreamromError as exc:
        assert str(exc) and "\n" not in str(exc)
    except _Timeout:
        pytest.fail(f"reading {folder} hung")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fuzzed_safetensors_headers_never_traceback_or_hang(tmp_path, tiny_models):
    original = (tiny_models["llama"] / "model.safetensors").read_bytes()
    folder = tmp_path / "fuzz"
    shutil.copytree(tiny_models["llama"], folder)
    rng = random.Random(1234)
    for mutated in _mutations(rng, original, 150):
        (folder / "model.safetensors").write_bytes(mutated)
        _read_within(folder)


def test_fuzzed_configs_never_traceback_or_hang(tmp_path, tiny_models):
    original = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    folder = tmp_path / "fuzz"
    shutil.copytree(tiny_models["qwen2"], folder)
    rng = random.Random(99)
    values = [None, -1, 0, 1, 3, 2**40, 1e300, float("nan"), "64", "", [], {}, True, 64.5]
    text = json.dumps(original)
    for case in range(200):
        if case % 4 == 0:  # raw text damage: truncation or a flipped byte
            raw = bytearray(text.encode())
            if rng.random() < 0.5:
                raw = raw[: rng.randrange(len(raw))]
            else:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(7)
            (folder / "config.json").write_bytes(bytes(raw))
        else:
            config = dict(original)
            for key in rng.sample(sorted(config), rng.randint(1, 3)):
                config[key] = rng.choice(values)
            (folder / "config.json").write_text(json.dumps(config))
        _read_within(folder)


@pytest.mark.parametrize("kind,layers,method", [("qwen2", "all", "rom"), ("qwen2", "all", "rom-centered"),
                                               ("llama", "last:2", "rom"), ("mistral", "0", "rom"),
                                               ("qwen2", "all", "structured"), ("llama", "1-2", "structured")])
def test_disk_estimate_equals_the_written_size(tiny_models, tiny_tokens, tmp_path, kind, layers, method):
    from streamrom.compression.config import parse_layers
    from streamrom.compression.pipeline import _output_bytes
    from streamrom.compression.planning import model_plan

    config = CompressConfig(ratio=0.5, layers=layers, method=method,
                            calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64))
    streamrom.compress(tiny_models[kind], tmp_path / "out", config)
    spec = CheckpointReader(tiny_models[kind]).spec
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    plan = model_plan(spec, config, parse_layers(layers, spec.num_layers), CheckpointReader(tiny_models[kind]).parameter_count(), 4)
    estimate = _output_bytes(spec, plan, 4, config.compression_method)
    assert estimate == index["metadata"]["total_size"]


@pytest.mark.parametrize("where", [0, 4, 9, 10, 11, 31])
def test_finiteness_check_in_slices_finds_a_bad_value_anywhere(where):
    """The loader's NaN/Inf check runs in slices (its peak): a value in any slice, at either edge, is found."""
    from streamrom.storage.checkpoint import all_finite

    values = torch.arange(32, dtype=torch.bfloat16).reshape(4, 8)
    assert all_finite(values, chunk=10)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = values.clone()
        broken.view(-1)[where] = bad
        assert not all_finite(broken, chunk=10)


def test_a_damaged_keep_order_in_the_progress_file_is_refused_on_resume(deep_tiny, tiny_tokens, tmp_path):
    """--neuron-selection pass1 records pass 1's orders in the progress file; a run killed after its plan
    whose recorded order is then damaged is refused on resume in one line naming --overwrite, before
    any block is written again; --overwrite starts over and finishes."""
    output = tmp_path / "out"
    command = cli_command(deep_tiny, output, tiny_tokens, "--method", "mixed", "--allocate", "spectrum",
                          "--target-params", "0.8", "--neuron-selection", "pass1")
    killed = run(command, fault="during-block-1")
    assert killed.returncode == -signal.SIGKILL
    from streamrom.compression.progress import CHECKSUM, _checksum

    progress = json.loads((output / PROGRESS_FILE).read_text())
    key = next(iter(progress["orders"]))
    progress["orders"][key] = progress["orders"][key][:-1]
    (output / PROGRESS_FILE).write_text(json.dumps(progress))
    shards = sorted(p.name for p in output.glob("model-*.safetensors"))
    refused = run(command)  # the record no longer matches its checksum
    assert refused.returncode == EXIT_OUTPUT and "--overwrite" in refused.stderr and "checksum" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    # the same damage with a checksum that matches it (a record written so): the order itself is checked
    del progress[CHECKSUM]
    progress[CHECKSUM] = _checksum(progress)
    (output / PROGRESS_FILE).write_text(json.dumps(progress))
    refused = run(command)
    assert refused.returncode == EXIT_OUTPUT and "--overwrite" in refused.stderr and key in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert sorted(p.name for p in output.glob("model-*.safetensors")) == shards
    assert run([*command, "--overwrite"]).returncode == 0


def test_large_buffers_are_mapped_and_handed_back_not_left_on_the_heap():
    """compress fixes glibc's mmap threshold: a buffer freed after another of its size was mapped would
    otherwise go to the brk heap (glibc raises its threshold on each such free), where its pages stay."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    probe = textwrap.dedent("""
        import ctypes, sys
        import numpy as np
        from streamrom.report import memory

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            print("no mallinfo2"); sys.exit()
        libc.mallinfo2.restype = Info
        if sys.argv[1] == "fixed":
            memory.keep_large_buffers_off_the_heap()
        np.ones(2 ** 21 + 4096)  # 16 MiB, mapped and freed at once
        mapped = libc.mallinfo2().hblkhd
        kept = np.ones(2 ** 21)
        print(libc.mallinfo2().hblkhd - mapped >= kept.nbytes)
    """)
    found = {how: subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True, check=True)
             .stdout.strip() for how in ("glibc's own", "fixed")}
    if "no mallinfo2" in found.values():
        pytest.skip("glibc before 2.33")
    assert found == {"glibc's own": "False", "fixed": "True"}


def test_compress_fixes_the_threshold_before_its_work(deep_tiny, tiny_tokens, tmp_path, monkeypatch):
    """The threshold is fixed by compress itself (a run stopped at the up-front memory check has done it),
    not left to a caller: the test above shows what it changes."""
    calls = []
    monkeypatch.setattr("streamrom.compression.pipeline.keep_large_buffers_off_the_heap", lambda: calls.append(1))

    class Tiny:
        available = 1000
    monkeypatch.setattr("streamrom.compression.pipeline.psutil.virtual_memory", lambda: Tiny())
    config = CompressConfig(calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64))
    with pytest.raises(ResourceError):
        streamrom.compress(deep_tiny, tmp_path / "out", config)
    assert calls == [1]
