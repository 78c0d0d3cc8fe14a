"""Reliability, round three: paths that lead where the user did not name (symlinks, `..`, loops), and
resource settings at their extremes. Each ends in a result or one line with the documented exit code,
and the source is never touched (docs/operations.md, "Paths").

Tiny random-weight models (files and control flow, not accuracy)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamrom.errors import EXIT_OUTPUT, EXIT_USAGE

from conftest import folder_digest
from helpers import model_files


def streamrom(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def compress(source, output, tokens, *extra, global_args=()) -> subprocess.CompletedProcess:
    return streamrom(*global_args, "compress", source, output, "--method", "rom", "--calib-tokens", tokens,
                     "--calib-sequences", "8",
                     "--calib-seqlen", "64", "--chunk-tokens", "128", *extra)


def one_line(result: subprocess.CompletedProcess) -> bool:
    lines = result.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("streamrom: error:")


@pytest.fixture
def source(tmp_path, tiny_models) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "src"))


# -- paths ------------------------------------------------------------------------------------------------
def test_output_through_a_symlink_into_the_source_is_refused(tmp_path, source, tiny_tokens):
    (source / "sub").mkdir()
    digest = folder_digest(source)
    (tmp_path / "link").symlink_to(source / "sub")
    result = compress(source, tmp_path / "link", tiny_tokens)
    assert result.returncode == EXIT_OUTPUT and one_line(result), result.stderr
    assert folder_digest(source) == digest


def test_output_with_dotdot_into_the_source_is_refused(tmp_path, source, tiny_tokens):
    digest = folder_digest(source)
    result = compress(source, tmp_path / "elsewhere" / ".." / "src" / "out", tiny_tokens)
    assert result.returncode == EXIT_OUTPUT and one_line(result), result.stderr
    assert folder_digest(source) == digest and not (source / "out").exists()


def test_output_symlink_loop_is_one_line(tmp_path, source, tiny_tokens):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for command in (compress(source, tmp_path / "a" / "out", tiny_tokens),
                    streamrom("export-gguf", source, tmp_path / "a" / "out.gguf")):
        assert command.returncode == EXIT_OUTPUT and one_line(command), command.stderr


def test_source_symlink_loop_is_one_line(tmp_path, tiny_tokens):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = compress(tmp_path / "a", tmp_path / "out", tiny_tokens)
    assert result.returncode == 3 and one_line(result), result.stderr
    assert not (tmp_path / "out").exists()


def test_symlinked_shards_are_read_through_like_a_hub_cache(tmp_path, source, tiny_tokens):
    """Hugging Face's cache keeps a snapshot's files as symlinks to blobs elsewhere: a symlinked file is the
    file the user named (its own target), so it is read; the result equals the plain folder's."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    linked = tmp_path / "snapshot"
    linked.mkdir()
    for path in source.iterdir():
        shutil.copy(path, blobs / path.name)
        (linked / path.name).symlink_to(blobs / path.name)
    digest = folder_digest(blobs)
    plain, via_links = compress(source, tmp_path / "plain", tiny_tokens), compress(linked, tmp_path / "linked", tiny_tokens)
    assert plain.returncode == 0 and via_links.returncode == 0, via_links.stderr
    assert model_files(tmp_path / "plain") == model_files(tmp_path / "linked")
    assert folder_digest(blobs) == digest


def test_export_never_writes_into_the_source(tmp_path, source):
    digest = folder_digest(source)
    (tmp_path / "link").symlink_to(source)
    (tmp_path / "shard-link.gguf").symlink_to(source / "model.safetensors")
    for output in (source / "model.gguf", tmp_path / "link" / "model.gguf", source / "model.safetensors",
                   tmp_path / "shard-link.gguf", tmp_path / "x" / ".." / "src" / "model.gguf"):
        result = streamrom("export-gguf", source, output, "--overwrite")
        assert result.returncode == EXIT_OUTPUT and one_line(result), (output, result.stderr)
        assert folder_digest(source) == digest


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, source, tiny_tokens):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(source / "model.safetensors", outside)
    names = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from safetensors import safe_open; "
                                       f"print(json.dumps(list(safe_open({str(outside)!r}, 'pt').keys())))"],
                                      capture_output=True, text=True, check=True).stdout)
    (source / "model.safetensors").unlink()
    for shard in ("../outside.safetensors", str(outside)):
        (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
        result = compress(source, tmp_path / "out", tiny_tokens)
        assert result.returncode == 3 and one_line(result) and "outside the folder" in result.stderr, result.stderr


# -- resource extremes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, global_args, code", [
    (["--chunk-tokens", "1"], [], 0),
    (["--calib-seqlen", "1"], [], EXIT_USAGE),
    (["--calib-sequences", "1"], [], 0),
    (["--target-params", "0.01"], [], EXIT_USAGE),
    (["--target-params", "0.999"], [], 0),
    (["--target-params", "0"], [], EXIT_USAGE),
    (["--target-params", "nan"], [], EXIT_USAGE),
    (["--ratio", "1e-9"], [], 0),
    (["--method", "mixed", "--allocate", "spectrum", "--target-params", "0.01"], [], EXIT_USAGE),
    ([], ["--threads", "0"], EXIT_USAGE),
    ([], ["--threads", "-1"], EXIT_USAGE),
    ([], ["--threads", "1000"], 0),
])
def test_resource_extremes(tmp_path, tiny_models, tiny_tokens, extra, global_args, code):
    source = tiny_models["llama"]
    digest = folder_digest(source)
    result = compress(source, tmp_path / "out", tiny_tokens, *extra, global_args=global_args)
    assert result.returncode == code, result.stderr
    if code:
        assert one_line(result), result.stderr
        assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
        assert not (tmp_path / "out" / "model.safetensors").exists()
    else:
        from streamrom.storage.checkpoint import CheckpointReader

        CheckpointReader(tmp_path / "out")  # a complete, valid checkpoint
    assert folder_digest(source) == digest
