"""Reliability, round two: no data loss, no silent mixes, a finished or interrupted run resumable or
complete. Each test reproduces a failure of an earlier version (docs/operations.md, "Running it nightly").

Streaming tests on tiny random-weight models and tiny GGUFs (files and control flow, not accuracy)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from streamrom.errors import EXIT_BUSY, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_RESOURCES, EXIT_USAGE
from streamrom.storage.locking import LOCK_FILE, OutputLock, private_folder
from streamrom.compression.progress import PROGRESS_FILE

from conftest import folder_digest, make_tiny
from helpers import write_tiny_gguf
from helpers import cli_command, model_files, run

INDEX = "model.safetensors.index.json"


@pytest.fixture
def bind_mount(tmp_path):
    """mount(folder) -> another path of the same folder (a bind mount); skipped where the machine
    does not allow mounts."""
    mounted = []

    def mount(folder: Path) -> Path:
        target = tmp_path / f"bound-{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "--bind", str(folder), str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"bind mounts are not allowed here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def copy_of(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    return where


def hidden_files(folder: Path) -> list[str]:
    """What a run leaves besides the model: lock, progress, work folder, temporaries (all dot-named)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- 1. the source under another path is still the source ------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_bind_mount_of_the_source_as_output_is_refused(deep_tiny, tiny_tokens, tmp_path, bind_mount, overwrite):
    source = copy_of(deep_tiny, tmp_path / "src")
    digest = folder_digest(source)
    alias = bind_mount(source)
    result = run(cli_command(source, alias, tiny_tokens, *(["--overwrite"] if overwrite else [])))
    assert result.returncode == EXIT_OUTPUT, result.stderr
    assert "is the source folder" in result.stderr and len(result.stderr.splitlines()) == 1
    assert folder_digest(source) == digest and not (source / LOCK_FILE).exists()


def test_output_inside_a_bind_mounted_source_is_refused(deep_tiny, tiny_tokens, tmp_path, bind_mount):
    source = copy_of(deep_tiny, tmp_path / "src")
    digest = folder_digest(source)
    result = run(cli_command(source, bind_mount(source) / "out", tiny_tokens, "--overwrite"))
    assert result.returncode == EXIT_OUTPUT and "inside the source folder" in result.stderr
    assert folder_digest(source) == digest


def test_symlinked_parent_of_the_source_is_the_source(deep_tiny, tiny_tokens, tmp_path):
    parent = tmp_path / "models"
    source = copy_of(deep_tiny, parent / "src")
    (tmp_path / "link").symlink_to(parent)
    digest = folder_digest(source)
    result = run(cli_command(source, tmp_path / "link" / "src", tiny_tokens, "--overwrite"))
    assert result.returncode == EXIT_OUTPUT and "is the source folder" in result.stderr
    contains = run(cli_command(source, tmp_path / "link", tiny_tokens, "--overwrite"))
    assert contains.returncode == EXIT_OUTPUT and "contains the source" in contains.stderr
    assert folder_digest(source) == digest


# -- 2, 3. import-gguf never deletes its source; one run per output -------------------------------------
def import_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", "import-gguf", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    folder = tmp_path / "ggufs"
    folder.mkdir()
    path = folder / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    (folder / "notes.txt").write_text("the user's other file\n")
    return path


@pytest.mark.parametrize("where", ["the file", "its folder", "cwd"])
def test_import_gguf_refuses_an_output_that_is_or_contains_the_source(tiny_gguf, where):
    digest = folder_digest(tiny_gguf.parent)
    if where == "cwd":
        result = import_cli(tiny_gguf.name, ".", "--overwrite", cwd=tiny_gguf.parent)
    else:
        result = import_cli(str(tiny_gguf), str(tiny_gguf if where == "the file" else tiny_gguf.parent), "--overwrite")
    assert result.returncode == EXIT_OUTPUT, result.stderr
    assert len(result.stderr.splitlines()) == 1 and ("is the source file" in result.stderr
                                                      or "contains the source" in result.stderr)
    assert folder_digest(tiny_gguf.parent) == digest


def test_import_gguf_into_the_current_folder(tiny_gguf, tmp_path):
    target = tmp_path / "here"
    target.mkdir()
    result = import_cli(str(tiny_gguf), ".", cwd=target)
    assert result.returncode == 0, result.stderr
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def test_concurrent_import_gguf_on_one_output_is_locked_out(tiny_gguf, tmp_path):
    output = tmp_path / "out"
    with OutputLock(tmp_path, lock_path=tmp_path / ".out.streamrom.lock"):
        busy = import_cli(str(tiny_gguf), str(output))
    assert busy.returncode == EXIT_BUSY and "another streamrom run" in busy.stderr
    assert not output.exists()
    assert import_cli(str(tiny_gguf), str(output)).returncode == 0
    assert not (tmp_path / ".out.streamrom.lock").exists()


# -- 4. a source changed in place between a kill and the resume ------------------------------------------
def test_source_changed_in_place_is_not_resumed(deep_tiny, tiny_tokens, tmp_path):
    source = copy_of(deep_tiny, tmp_path / "src")
    output = tmp_path / "out"
    assert run(cli_command(source, output, tiny_tokens), fault="after-block-1").returncode == -signal.SIGKILL
    data = bytearray((source / "model.safetensors").read_bytes())
    data[-4:] = bytes(4)  # one weight of the last tensor: same header, same size, other bytes
    with open(source / "model.safetensors", "r+b") as handle:  # in place: same inode
        handle.write(data)
    result = run(cli_command(source, output, tiny_tokens))
    assert result.returncode == EXIT_OUTPUT, result.stderr
    assert "source file model.safetensors changed" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (output / INDEX).exists()


# -- 5. the lock is held until the run has done everything ------------------------------------------------
def wait_stopped(process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while psutil.Process(process.pid).status() != psutil.STATUS_STOPPED:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run never reached the stop point"
        time.sleep(0.1)


def test_lock_is_held_after_the_index_until_the_end(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "out"
    env = {**os.environ, "STREAMROM_FAULT": "stop:after-index"}
    first = subprocess.Popen(cli_command(deep_tiny, output, tiny_tokens), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(first)
        assert (output / INDEX).exists()
        second = run(cli_command(deep_tiny, output, tiny_tokens, "--overwrite"))
        assert second.returncode == EXIT_BUSY, second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0
    assert model_files(output) == reference and (output / "streamrom-report.json").is_file()
    assert not (output / LOCK_FILE).exists() and not (output / PROGRESS_FILE).exists()


# -- 6. config and tensors that disagree ------------------------------------------------------------------
def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("fewer layers in config", "num_hidden_layers 2"),
    ("extra block", "belong to blocks 0..3"),
    ("tied with a head", "tie_word_embeddings"),
    ("integer weight", "dtype I32"),
    ("unknown tensor", "is not part of the model"),
    ("text sliding window", "sliding_window must be a positive integer"),
])
def test_config_and_tensors_that_disagree_are_refused(tmp_path, tiny_tokens, case, message):
    source = make_tiny(tmp_path / "src", "mistral" if case == "text sliding window" else "llama")
    if case == "fewer layers in config":
        _edit_config(source, num_hidden_layers=2)
    elif case == "extra block":
        _edit_tensors(source, lambda s: s.update({k.replace("layers.2.", "layers.3."): v.clone()
                                                  for k, v in list(s.items()) if "layers.2." in k}))
    elif case == "tied with a head":
        _edit_config(source, tie_word_embeddings=True)
    elif case == "integer weight":
        key = "model.layers.1.input_layernorm.weight"
        _edit_tensors(source, lambda s: s.update({key: s[key].to(torch.int32)}))
    elif case == "unknown tensor":
        _edit_tensors(source, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    else:
        _edit_config(source, sliding_window="sixteen")
    digest = folder_digest(source)
    result = run(cli_command(source, tmp_path / "out", tiny_tokens))
    assert result.returncode == EXIT_INPUT, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert folder_digest(source) == digest and not (tmp_path / "out").exists()


# -- 7. killed after the index: the same command finishes the rest ----------------------------------------
@pytest.mark.parametrize("point", ["after-tail", "after-index", "after-evaluation"])
def test_kill_after_the_index_then_rerun_finishes(deep_tiny, tiny_tokens, tmp_path, reference, point):
    output = tmp_path / "out"
    killed = run(cli_command(deep_tiny, output, tiny_tokens), fault=point)
    assert killed.returncode == -signal.SIGKILL
    assert (output / INDEX).exists()
    command = cli_command(deep_tiny, output, tiny_tokens)
    command.remove("--quiet")
    again = run(command)
    assert again.returncode == 0, again.stderr
    assert "block 1/6 done" not in again.stderr, "nothing is compressed again"
    assert model_files(output) == reference
    assert hidden_files(output) == [] and (output / "streamrom-report.json").is_file()


# -- 8. stray temporaries, and shards lost between a kill and the resume ----------------------------------
def test_resume_leaves_no_stray_temporary(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "out"
    assert run(cli_command(deep_tiny, output, tiny_tokens), fault="writing-block-3").returncode == -signal.SIGKILL
    (output / ".tmpAb12Cd").write_bytes(bytes(25_000))  # what safetensors' own temporary file left before
    assert run(cli_command(deep_tiny, output, tiny_tokens)).returncode == 0
    assert hidden_files(output) == []
    assert model_files(output) == reference


@pytest.mark.parametrize("damage", ["deleted", "truncated", "embedding deleted"])
def test_lost_shard_is_redone_alone(deep_tiny, tiny_tokens, tmp_path, reference, damage):
    output = tmp_path / "out"
    assert run(cli_command(deep_tiny, output, tiny_tokens), fault="after-block-3").returncode == -signal.SIGKILL
    shard = output / ("model-00001-of-00008.safetensors" if damage == "embedding deleted"
                      else "model-00003-of-00008.safetensors")  # block 1's
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()
    command = cli_command(deep_tiny, output, tiny_tokens)
    command.remove("--quiet")
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr
    if damage != "embedding deleted":
        assert "redoing block(s) 1" in resumed.stderr
    assert "block 3/6 done" not in resumed.stderr and "block 5/6 done" in resumed.stderr
    assert model_files(output) == reference


# -- 9. a refused run leaves no lock ----------------------------------------------------------------------
def test_refused_runs_leave_no_lock(deep_tiny, tiny_tokens, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine\n")
    refused = run(cli_command(deep_tiny, users, tiny_tokens))
    assert refused.returncode == EXIT_OUTPUT and sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    finished = tmp_path / "finished"
    assert run(cli_command(deep_tiny, finished, tiny_tokens)).returncode == 0
    before = sorted(p.name for p in finished.iterdir())
    again = run(cli_command(deep_tiny, finished, tiny_tokens))
    assert again.returncode == EXIT_OUTPUT and sorted(p.name for p in finished.iterdir()) == before
    assert LOCK_FILE not in before


# -- 11, 14. the report path and the log file --------------------------------------------------------------
@pytest.mark.parametrize("where", ["a folder", "under a file", "missing folder"])
def test_unusable_report_path_is_refused_before_the_work(deep_tiny, tiny_tokens, tmp_path, where):
    (tmp_path / "afile").write_text("x")
    report = {"a folder": tmp_path, "under a file": tmp_path / "afile" / "r.json",
              "missing folder": tmp_path / "nope" / "r.json"}[where]
    started = time.monotonic()
    result = run(cli_command(deep_tiny, tmp_path / "out", tiny_tokens, "--report", str(report)))
    assert result.returncode == EXIT_OUTPUT and "--report" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and time.monotonic() - started < 60


def test_log_file_inside_the_output_is_kept(deep_tiny, tiny_tokens, tmp_path, reference):
    output = tmp_path / "out"
    output.mkdir()
    log_file = output / "run.log"
    command = cli_command(deep_tiny, output, tiny_tokens)
    command[3:3] = ["--log-file", str(log_file)]
    assert run(command).returncode == 0
    assert run(command[:] + ["--overwrite"]).returncode == 0
    assert model_files(output) == reference
    assert log_file.read_text().count("compressed") >= 2, "both runs logged, the log kept"


# -- 10, 12, 13. exit codes ---------------------------------------------------------------------------------
def test_disk_full_during_pass_one_and_import_is_exit_6(deep_tiny, tiny_tokens, tiny_gguf, tmp_path):
    from helpers import limit_file_size

    full = run(cli_command(deep_tiny, tmp_path / "out", tiny_tokens, "--allocate", "spectrum"),
               preexec=limit_file_size(60_000))
    assert full.returncode == EXIT_RESOURCES and "no space left" in full.stderr, full.stderr
    imported = subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", "import-gguf", str(tiny_gguf),
                               str(tmp_path / "imported")], capture_output=True, text=True,
                              preexec_fn=limit_file_size(2_000), timeout=300)
    assert imported.returncode == EXIT_RESOURCES and "no space left" in imported.stderr, imported.stderr
    assert len(imported.stderr.splitlines()) == 1 and not (tmp_path / "imported").exists()


def test_empty_output_folder_on_a_read_only_file_system(deep_tiny, tiny_tokens, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        result = run(cli_command(deep_tiny, mount, tiny_tokens))
        assert result.returncode == EXIT_OUTPUT and "cannot write in" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("extra, code, message", [
    (["--target-size", "nan"], EXIT_USAGE, "--target-size must be positive"),
    (["--target-size", "inf"], EXIT_USAGE, "--target-size must be positive"),
    (["--seed", "-5"], EXIT_USAGE, "expected an integer >= 0"),
    (["--layers", "5-2"], EXIT_USAGE, "is empty"),
    (["--allocate", "spectrum", "--spectra", "BAD"], EXIT_INPUT, "cannot read the first-pass file"),
    (["--allocate", "spectrum", "--spectra", "JUNK"], EXIT_INPUT, "not a .npz file"),
    (["--calib-tokens", "NPZ"], EXIT_INPUT, "archive of several arrays"),
])
def test_bad_arguments_fail_before_any_work(deep_tiny, tiny_tokens, tmp_path, extra, code, message):
    import numpy as np

    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(tmp_path / "tokens.npz", a=np.arange(10), b=np.arange(5))
    (tmp_path / "junk.npz").write_bytes(b"garbage" * 10)  # numpy calls it pickled data
    extra = [{"BAD": str(tmp_path / "bad.npz"), "NPZ": str(tmp_path / "tokens.npz"),
              "JUNK": str(tmp_path / "junk.npz")}.get(e, e) for e in extra]
    command = cli_command(deep_tiny, tmp_path / "out", tiny_tokens, *extra)
    if "--calib-tokens" in extra:  # the given one replaces the fixture's
        first = command.index("--calib-tokens")
        del command[first:first + 2]
    result = run(command)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- 15. Ctrl-C during start-up ------------------------------------------------------------------------------
# Before ~0.05 s the interpreter itself is starting (runpy, site): no code of ours runs yet.
@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3, 0.5, 1.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(deep_tiny, tiny_tokens, tmp_path, delay):
    from helpers import default_sigint

    process = subprocess.Popen(cli_command(deep_tiny, tmp_path / "out", tiny_tokens), stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == EXIT_INTERRUPTED, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("streamrom: interrupted"), err
    assert run(cli_command(deep_tiny, tmp_path / "out", tiny_tokens)).returncode == 0


HOOK = """
import os, signal, sys

class CtrlCInsideTorch:
    # Ctrl-C pressed while torch is importing torch.distributed, the moment the clean-clone CI once hit
    # (a KeyboardInterrupt raised there, in a callback torch's C++ runs, aborted the process)
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torch.distributed" and not self.done:
            self.done = True
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10000):  # the handler runs between these bytecodes
                pass
            with open(os.environ["STREAMROM_TEST_MARK"], "w") as mark:
                mark.write("the import went on")
        return None

sys.meta_path.insert(0, CtrlCInsideTorch())
"""


def test_ctrl_c_inside_torchs_import_waits_for_the_import_to_end(deep_tiny, tiny_tokens, tmp_path):
    """Deterministic: SIGINT delivered inside torch's import (a start-up hook finds torch.distributed,
    signals the process and lets the handler run): nothing is raised inside the import, which goes on,
    and the command then ends with one line and exit 130."""
    from helpers import default_sigint

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "mark"
    env = {**{k: v for k, v in os.environ.items() if k != "STREAMROM_FAULT"},
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "STREAMROM_TEST_MARK": str(mark)}
    process = subprocess.run(cli_command(deep_tiny, tmp_path / "out", tiny_tokens), capture_output=True, text=True,
                             env=env, preexec_fn=default_sigint, timeout=300)
    assert mark.is_file(), f"the interrupt was raised inside torch's import: {process.stderr[-800:]}"
    assert process.returncode == EXIT_INTERRUPTED, process.stderr
    assert process.stderr.strip().splitlines() == [process.stderr.strip()] and \
        process.stderr.startswith("streamrom: interrupted"), process.stderr
    assert not (tmp_path / "out").exists()


# -- Also: file modes, eval's activation files, ratios near 1 ------------------------------------------------
def test_shards_follow_the_umask(deep_tiny, tiny_tokens, tmp_path):
    def umask_022() -> None:
        os.umask(0o022)
    result = subprocess.run(cli_command(deep_tiny, tmp_path / "out", tiny_tokens), capture_output=True, text=True,
                            preexec_fn=umask_022, timeout=300)
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").glob("*.safetensors")}
    assert set(modes.values()) == {0o644}, modes


def test_killed_eval_leaves_no_activation_files(smollm2_dir, tmp_path):
    from conftest import EVAL_TEXT

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "streamrom.cli", "--quiet", "eval", str(smollm2_dir),
                                "--text", str(EVAL_TEXT), "--max-windows", "8", "--report", str(tmp_path / "r.json")],
                               env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    def open_in_tmp() -> bool:
        try:
            return any(str(tmp_path) in os.readlink(fd) for fd in Path(f"/proc/{process.pid}/fd").iterdir())
        except OSError:  # a descriptor closed while we looked
            return False

    while not open_in_tmp():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert list(tmp_path.iterdir()) == [], "activation files outlive a killed eval"


def test_ratio_near_one_leaves_linears_dense():
    from streamrom.model.modeling import ModelSpec
    from streamrom.compression.config import CompressConfig
    from streamrom.compression.planning import rank_plan

    spec = ModelSpec.from_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                  "num_hidden_layers": 2, "num_attention_heads": 32, "vocab_size": 32000})
    assert all(rank is not None for rank in rank_plan(spec, CompressConfig(ratio=0.9)).values())
    # rank 2040 of 4096 would save 0.4 % of a 4096 x 4096 projection: left dense
    assert all(rank is None for rank in rank_plan(spec, CompressConfig(ratio=0.999)).values())


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 192 KiB (tmpfs), where writes fail with ENOSPC; skipped without mounts."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a small file system here")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_really_full_disk_is_exit_6_and_resumable(deep_tiny, tiny_tokens, tmp_path, small_disk, reference,
                                                    monkeypatch, capsys):
    """ENOSPC from the file system itself (safetensors reports it as its own error type), past an up-front
    check that saw room (another process filled the disk meanwhile)."""
    from collections import namedtuple

    from streamrom.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("streamrom.storage.layout.shutil.disk_usage", lambda path: usage(10**12, 0, 10**12))
    output = small_disk / "out"
    arguments = cli_command(deep_tiny, output, tiny_tokens)[3:]  # without "python -m streamrom.cli"
    assert main(arguments) == EXIT_RESOURCES
    err = capsys.readouterr().err
    assert "no space left" in err and len(err.splitlines()) == 1 and not (output / INDEX).exists()
    moved = tmp_path / "moved"  # the user frees space: here, by moving the run to a larger disk
    shutil.copytree(output, moved)
    arguments[arguments.index(str(output))] = str(moved)
    assert main(arguments) == 0
    assert model_files(moved) == reference


def test_import_gguf_onto_a_full_disk_is_exit_6(tiny_gguf, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(bytes(150_000))
    result = import_cli(str(tiny_gguf), str(small_disk / "imported"))
    assert result.returncode == EXIT_RESOURCES and "no space left" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (small_disk / "imported").exists()


def test_eval_from_a_read_only_folder_refuses_before_the_work(tiny_models, tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "streamrom.cli", "eval", str(tiny_models["llama"]),
                                 "--text", str(tmp_path / "none.txt")], capture_output=True, text=True,
                                cwd=readonly, timeout=300)
    finally:
        subprocess.run(["umount", str(readonly)], check=False)
    # refused for the report before the (missing) text is even looked at
    assert result.returncode == EXIT_OUTPUT and "cannot be written" in result.stderr, result.stderr
    assert time.monotonic() - started < 60


def test_private_folder_removes_only_dead_holders_folders(tmp_path):
    """A tune-worker's scratch folder: those of processes of this host that died are removed by the next
    one; a live process's (its lock held), another host's and a stranger's are left alone."""
    import socket

    host, prefix = socket.gethostname(), "streamrom-worker-"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{prefix}{host}.{dead.pid}.abc"
    (left / "trial").mkdir(parents=True)
    elsewhere = tmp_path / f"{prefix}otherhost.{dead.pid}.abc"
    stranger = tmp_path / f"{prefix}notes"
    for folder in (elsewhere, stranger):
        folder.mkdir()
    with private_folder(tmp_path, prefix) as live:
        assert live.is_dir() and live.name.startswith(f"{prefix}{host}.{os.getpid()}.")
        assert not left.exists() and elsewhere.is_dir() and stranger.is_dir()
        # a holder alive in another pid namespace: its pid looks dead here, its lock says otherwise
        alien = tmp_path / f"{prefix}{host}.{dead.pid}.xyz"
        with OutputLock(alien):
            with private_folder(tmp_path, prefix) as second:
                assert live.is_dir() and alien.is_dir() and second != live
        assert live.is_dir()
    assert not live.exists() and alien.is_dir()
    with private_folder(tmp_path, prefix):  # the alien's holder has gone now
        assert not alien.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([elsewhere.name, stranger.name])
