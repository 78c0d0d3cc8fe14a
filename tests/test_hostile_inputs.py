"""Reliability, round three: every parser a user's file reaches, fed hostile input.

Each case must end as a result or as one StreamromError (one line, its documented exit code), within
a bounded time and memory: never another exception (the CLI would print "internal error", exit 5),
a hang, or a partial output. The cases come from hypothesis, mutating real files (a tiny random-weight
checkpoint saved by transformers, a tiny GGUF laid out as llama.cpp's converter does, a real
tokenizer.json, .npy and .npz files written by numpy). STREAMROM_FUZZ_EXAMPLES sets the examples per
parser (the optional long run, `python -m benchmarks.reliability.sweep --only fuzz`, raises it and writes docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from streamrom.errors import EXIT_INPUT, StreamromError

from conftest import make_tiny
from helpers import write_tiny_gguf

EXAMPLES = int(os.environ.get("STREAMROM_FUZZ_EXAMPLES", "100"))
CASE_SECONDS = 20  # one case: far above what any parser needs; a hang ends here, as a failure
CASE_MEMORY = 2 << 30  # one case may map this much more than the process had: an absurd size fails here
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTS: dict[str, dict[str, int]] = {}  # parser -> outcome -> cases (read by `python -m benchmarks.reliability.sweep --only fuzz`)
ABSURD_NUMBERS = [0, -1, 1, 3, 2**31 - 1, 2**31, 10**9, 2**63 - 1, 2**64, -2**63]
ABSURD_VALUES = ABSURD_NUMBERS + [1.5, float("nan"), "7", "", None, True, False, [], [1], {}, {"a": 1}]


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int = CASE_SECONDS, memory: int = CASE_MEMORY):
    """Time (SIGALRM raises Hang) and address space (past it, allocations raise MemoryError) for one case."""
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def outcome(parser: str, call) -> str:
    """Runs `call` in bounds: "ok", or "exit N" for a StreamromError; anything else fails the test."""
    with bounded():
        try:
            call()
            result = "ok"
        except StreamromError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"not one line: {message!r}"
            assert "Traceback" not in message
            result = f"exit {exc.exit_code}"
    COUNTS.setdefault(parser, {}).setdefault(result, 0)
    COUNTS[parser][result] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def write_counts():
    yield
    report = os.environ.get("STREAMROM_FUZZ_REPORT")
    if report:
        existing = json.loads(Path(report).read_text()) if Path(report).is_file() else {}
        for parser, outcomes in COUNTS.items():
            for result, count in outcomes.items():
                existing.setdefault(parser, {}).setdefault(result, 0)
                existing[parser][result] += count
        Path(report).write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")


# -- sources: real files of every kind, made once ---------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("fuzz") / "llama", "llama")


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("fuzz") / "gemma", "gemma3_text")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    return path.read_bytes()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> dict:
    """A real byte-level BPE tokenizer.json (SmolLM2's is too slow to mutate; this one is built by
    tokenizers itself from a few merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({"th": len(vocab), "the": len(vocab) + 1})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("th", "e")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return json.loads(tokenizer.to_str())


def folder_with(source: Path, **files: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    shutil.rmtree(folder)
    shutil.copytree(source, folder)
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data)
    return folder


def read_everything(folder: Path) -> None:
    from streamrom.storage.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    reader.read(sorted(reader.weight_map))


# -- the hang: a block count far beyond the tensors' -----------------------------------------------------
@pytest.mark.parametrize("count", [10**9, 2**31 - 1, 4])
@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_absurd_block_count_is_refused_before_anything_is_sized(tmp_path, checkpoint, gemma_checkpoint, kind, count):
    """A config.json with num_hidden_layers 10**9 beside 3 blocks of tensors once made every command
    build the names of 10**9 blocks (and Gemma's layer types) before comparing: now the tensors' count
    is read first. In-process, under the harness's time bound."""
    source = folder_with(checkpoint if kind == "llama" else gemma_checkpoint)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = count
    config.pop("layer_types", None)
    (source / "config.json").write_text(json.dumps(config))
    from streamrom.storage.checkpoint import CheckpointReader

    with bounded(seconds=5):
        with pytest.raises(StreamromError) as caught:
            CheckpointReader(source)
    assert caught.value.exit_code == EXIT_INPUT
    assert f"num_hidden_layers {count}" in str(caught.value) and "blocks 0..2" in str(caught.value)
    shutil.rmtree(source)


@pytest.mark.parametrize("command", ["inspect", "compress", "eval", "export-gguf"])
def test_absurd_block_count_every_command_one_line_exit_3(tmp_path, checkpoint, command):
    source = folder_with(checkpoint)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (source / "config.json").write_text(json.dumps(config))
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(256) % 200)
    (tmp_path / "text.txt").write_text("the theory of the thing " * 50)
    args = {"inspect": [str(source)],
            "compress": [str(source), str(tmp_path / "out"), "--calib-tokens", str(tokens)],
            "eval": [str(source), "--text", str(tmp_path / "text.txt")],
            "export-gguf": [str(source), str(tmp_path / "out.gguf")]}[command]
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", command, *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_INPUT, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "num_hidden_layers 1000000000" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()
    shutil.rmtree(source)


def test_absurd_gguf_block_count_is_refused(tmp_path):
    from streamrom.gguf.importer import import_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", block_count=10**9)
    with bounded(seconds=10):
        with pytest.raises(StreamromError) as caught:
            import_gguf(str(path), tmp_path / "out")
    assert caught.value.exit_code == EXIT_INPUT and "block_count is 1000000000" in str(caught.value)
    assert not (tmp_path / "out").exists()


# -- safetensors headers ----------------------------------------------------------------------------------
def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


header_edits = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3",
                                                 "X", "", 7, None])),
    st.tuples(st.just("shape"), st.lists(st.sampled_from(ABSURD_NUMBERS + [64, 160]), max_size=4)
              | st.sampled_from([None, "64", [1.5], [[64]]])),
    st.tuples(st.just("data_offsets"), st.lists(st.sampled_from(ABSURD_NUMBERS + [0, 256, 4096, 10**6]),
                                                min_size=0, max_size=3) | st.sampled_from([None, "0", [0.5, 1]])),
    st.tuples(st.just("delete"), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("overlap"), st.just(None)),
    st.tuples(st.just("rename"), st.sampled_from(["model.layers.7.mlp.up_proj.weight", "lm_head.weight", "",
                                                  "model.layers.-1.x", "model.layers.99999999999999999999.x"])),
)


@given(edits=st.lists(st.tuples(st.integers(0, 10**6), header_edits), min_size=1, max_size=3),
       length=st.sampled_from([None, None, 0, 1, 2**40, 2**64 - 1, 10**8]),
       cut=st.sampled_from([None, None, 0, 7, 100, -1, -4096]))
@FUZZ
def test_fuzzed_safetensors_header(checkpoint, edits, length, cut):
    header, body = _split_safetensors((checkpoint / "model.safetensors").read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    for pick, (kind, value) in edits:
        name = names[pick % len(names)]
        if name not in header:
            continue
        if kind == "delete":
            header[name].pop(value, None)
        elif kind == "overlap":
            other = header.get(names[(pick + 1) % len(names)])
            if isinstance(other, dict):
                header[name]["data_offsets"] = other.get("data_offsets")
        elif kind == "rename":
            header[value] = header.pop(name)
        else:
            header[name][kind] = value
    data = _join_safetensors(header, body, length)
    if cut is not None:
        data = data[:cut]
    source = folder_with(checkpoint, model__safetensors=data)
    try:
        outcome("safetensors header", lambda: read_everything(source))
    finally:
        shutil.rmtree(source)


@given(flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=8))
@FUZZ
def test_fuzzed_safetensors_bytes(checkpoint, flips):
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    for where, value in flips:
        data[where % min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]))[0] + 64)] = value
    source = folder_with(checkpoint, model__safetensors=bytes(data))
    try:
        outcome("safetensors bytes", lambda: read_everything(source))
    finally:
        shutil.rmtree(source)


# -- config.json --------------------------------------------------------------------------------------
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window", "rope_scaling", "attention_bias", "mlp_bias", "model_type",
                 "hidden_act", "layer_types", "query_pre_attn_scalar", "sliding_window_pattern",
                 "layer_intermediate_sizes", "layer_value_head_dims", "layer_query_key_head_dims", "rope_parameters"]


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_every_config_field_at_every_hostile_value(checkpoint, gemma_checkpoint, field):
    """Exhaustive: each field at each absurd value, in a llama and a Gemma 3 config."""
    for source_model in (checkpoint, gemma_checkpoint):
        config = json.loads((source_model / "config.json").read_text())
        source = folder_with(source_model)
        try:
            for value in ABSURD_VALUES:
                (source / "config.json").write_text(json.dumps({**config, field: value}))
                outcome("config.json", lambda: read_everything(source))
        finally:
            shutil.rmtree(source)


@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), st.sampled_from(ABSURD_VALUES), min_size=1, max_size=4),
       gemma=st.booleans())
@FUZZ
def test_fuzzed_config_combinations(checkpoint, gemma_checkpoint, changes, gemma):
    source_model = gemma_checkpoint if gemma else checkpoint
    config = json.loads((source_model / "config.json").read_text())
    source = folder_with(source_model, config__json=json.dumps({**config, **changes}).encode())
    try:
        outcome("config.json", lambda: read_everything(source))
    finally:
        shutil.rmtree(source)


@given(text=st.binary(max_size=64) | st.sampled_from([b"", b"[]", b"null", b"\xff\xfe{", b'{"model_type": 1}']))
@FUZZ
def test_config_that_is_not_a_config(checkpoint, text):
    source = folder_with(checkpoint, config__json=text)
    try:
        assert outcome("config.json", lambda: read_everything(source)) == f"exit {EXIT_INPUT}"
    finally:
        shutil.rmtree(source)


# -- GGUF files ---------------------------------------------------------------------------------------
def import_to_fresh_folder(path: Path) -> None:
    from streamrom.gguf.importer import import_gguf

    output = path.parent / "imported"
    try:
        import_gguf(str(path), output)
    except StreamromError:
        assert not output.exists(), "a refused import left an output behind"
        assert not any(p.name.startswith(".imported") for p in path.parent.iterdir()), "a temporary was left"
        raise


gguf_edits = st.one_of(
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 10**6), st.integers(0, 255))),
    st.tuples(st.just("u64"), st.tuples(st.sampled_from([8, 16]), st.sampled_from(ABSURD_NUMBERS[:8]))),
    st.tuples(st.just("magic"), st.sampled_from([b"GGML", b"\0\0\0\0", b"FUGG"])),
    st.tuples(st.just("version"), st.sampled_from([0, 1, 2, 4, 2**32 - 1])),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
)


@given(edits=st.lists(gguf_edits, min_size=1, max_size=4))
@FUZZ
def test_fuzzed_gguf(gguf_bytes, edits):
    data = bytearray(gguf_bytes)
    for kind, value in edits:
        if kind == "flip" and data:  # mostly in the header and metadata, where the parser reads counts and lengths
            where, byte = value
            data[where % min(len(data), 16384)] = byte
        elif kind == "u64" and len(data) >= 24:
            data[value[0]:value[0] + 8] = struct.pack("<Q", value[1] % 2**64)
        elif kind == "magic":
            data[:4] = value
        elif kind == "version" and len(data) >= 8:
            data[4:8] = struct.pack("<I", value)
        elif kind == "cut":
            del data[value % max(len(data), 1):]
    folder = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
    try:
        (folder / "model.gguf").write_bytes(bytes(data))
        outcome("GGUF", lambda: import_to_fresh_folder(folder / "model.gguf"))
    finally:
        shutil.rmtree(folder)


GGUF_KEYS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.context_length", "llama.rope.freq_base",
             "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.attention.key_length",
             "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.token_type", "llama.rope.scaling.type"]


@given(key=st.sampled_from(GGUF_KEYS),
       value=st.sampled_from([0, 1, 2**31 - 1, 10**9, 2**63 - 1, -1, 1.5, "llama", "qwen9", "", [], [0, 1], ["a"]]))
@FUZZ
def test_fuzzed_gguf_metadata_values(tmp_path_factory, key, value):
    """A GGUF written with one metadata value replaced (any type), as a hostile converter could."""
    folder = tmp_path_factory.mktemp("gguf-meta")
    write_tiny_gguf(folder / "model.gguf", "llama", override={key: value})
    try:
        outcome("GGUF metadata", lambda: import_to_fresh_folder(folder / "model.gguf"))
    finally:
        shutil.rmtree(folder)


# -- tokenizer.json (compress/eval read it with tokenizers; export-gguf reads it as JSON) ------------------
def _mutate(tree, path: list, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree[:4]):
            yield prefix + (index,)
            yield from _paths(value, prefix + (index,))


def tokenize_and_export(folder: Path) -> None:
    from streamrom.stream.calibration import load_tokenizer
    from streamrom.gguf.exporter import export_gguf

    tokenizer = load_tokenizer(folder)
    tokenizer.encode("the theory of the thing")
    output = folder.with_name(folder.name + ".gguf")  # beside the source: never inside it
    try:
        export_gguf(folder, output)
    finally:
        output.unlink(missing_ok=True)


@given(pick=st.integers(0, 10**6), value=st.sampled_from(ABSURD_VALUES + ["BPE", "Unigram", {"type": "BPE"}]),
       added=st.sampled_from([None, [{"id": 10**12, "content": "x"}], [{"id": -5, "content": "x"}], [{"id": "a"}], [7]]))
@FUZZ
def test_fuzzed_tokenizer_json(checkpoint, tokenizer_json, pick, value, added):
    tree = json.loads(json.dumps(tokenizer_json))
    paths = list(_paths(tree))
    _mutate(tree, list(paths[pick % len(paths)]), value)
    if added is not None:
        tree["added_tokens"] = added
    source = folder_with(checkpoint, tokenizer__json=json.dumps(tree).encode())
    try:
        outcome("tokenizer.json", lambda: tokenize_and_export(source))
    finally:
        shutil.rmtree(source)


@given(text=st.binary(max_size=48))
@FUZZ
def test_tokenizer_json_that_is_not_json(checkpoint, text):
    source = folder_with(checkpoint, tokenizer__json=text)
    try:
        outcome("tokenizer.json", lambda: tokenize_and_export(source))
    finally:
        shutil.rmtree(source)


# -- .npy token files, --spectra files, --ranks-from reports ------------------------------------------
def damaged(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    """`data` with each (where, byte) of `flips` written in (where taken modulo its length), then cut at `cut`."""
    data = bytearray(data)
    for where, value in flips:
        data[where % len(data)] = value
    if cut is not None:
        del data[cut:]
    return bytes(data)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@given(array=st.sampled_from([np.arange(10), np.arange(10, dtype=np.uint8), np.zeros((2, 3, 4), np.int32),
                              np.array([1.5]), np.array([300]), np.array([-1]), np.zeros(0, np.int64),
                              np.array(["a"]), np.array([True])]),
       flips=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), max_size=4),
       cut=st.sampled_from([None, 0, 6, 10, 60]))
@FUZZ
def test_fuzzed_token_npy(tmp_path_factory, array, flips, cut):
    from streamrom.stream.calibration import load_token_file

    path = tmp_path_factory.mktemp("npy") / "tokens.npy"
    path.write_bytes(damaged(_npy(array), flips, cut))
    outcome(".npy tokens", lambda: load_token_file(path, 256))


@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.sampled_from([None, 0, 30, 200]))
@FUZZ
def test_fuzzed_spectra_file(tmp_path_factory, flips, cut):
    from streamrom.compression.spectra import read_saved

    buffer = io.BytesIO()
    np.savez(buffer, **{"model.layers.0.mlp.up_proj": np.linspace(1, 0, 16), "fingerprint": np.array("abc")})
    path = tmp_path_factory.mktemp("npz") / "spectra.npz"
    path.write_bytes(damaged(buffer.getvalue(), flips, cut))
    outcome("--spectra", lambda: read_saved(path))


RANK_KEYS = ["model.layers.0.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.3.mlp.up_proj",
             "model.layers.0.mlp.neurons", "model.layers.0.self_attn.value_dims", "lm_head", "", "model.layers.x.mlp.up_proj"]


@given(ranks=st.dictionaries(st.sampled_from(RANK_KEYS), st.sampled_from(ABSURD_VALUES + [8, 16]), max_size=4)
       | st.sampled_from([[], "ranks", 7, None]),
       method=st.sampled_from(["rom", "structured", "mixed"]),
       wrapper=st.sampled_from(["report", "bare", "not json"]))
@FUZZ
def test_fuzzed_ranks_from(tmp_path_factory, checkpoint, ranks, method, wrapper):
    """A --ranks-from report, hand-edited or another model's, checked against this model's plan."""
    from streamrom.storage.checkpoint import CheckpointReader
    from streamrom.cli import _ranks_from
    from streamrom.compression.pipeline import CompressConfig
    from streamrom.compression.planning import model_plan

    path = tmp_path_factory.mktemp("ranks") / "report.json"
    text = {"report": json.dumps({"ranks": ranks}), "bare": json.dumps(ranks), "not json": "{ranks"}[wrapper]
    path.write_text(text)
    spec = CheckpointReader(checkpoint).spec

    def plan():
        config = CompressConfig(method=method, ranks=_ranks_from(path))
        config.validate() if hasattr(config, "validate") else None
        model_plan(spec, config, list(range(spec.num_layers)), 0, 4)

    outcome("--ranks-from", plan)


# -- the progress record of an interrupted run -----------------------------------------------------------
GOOD_PROGRESS = {"arguments": "a" * 64, "source": "b" * 64, "blocks_done": 1, "inputs_file": "activations-b.f32",
                 "ranks": {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.down_proj": None},
                 "plan": {"model.layers.1.self_attn.q_proj": 8},
                 "weight_map": {"model.embed_tokens.weight": "model-00001-of-00005.safetensors"},
                 "format": 1, "stage": "compressing", "source_files": {"config.json": [836, 17, 65024, 5326875]},
                 "trials": [], "study": "", "orders": {"model.layers.2.mlp.neurons": [4, 2, 0]}}


@pytest.mark.parametrize("field, value", [
    ("blocks_done", "1"), ("blocks_done", True), ("blocks_done", -2), ("inputs_file", {"a": None}),
    ("ranks", []), ("ranks", {"model.layers.0.self_attn.q_proj": 0}), ("plan", {"x": "8"}), ("plan", {"x": -1}),
    ("weight_map", {"model.embed_tokens.weight": ""}), ("weight_map", {"w": "../../elsewhere.safetensors"}),
    ("source_files", 1.5), ("source_files", {"config.json": [1, 2]}), ("trials", True), ("trials", [1]),
    ("study", True), ("orders", []), ("orders", {"n": [1, "2"]}), ("stage", "done"), ("arguments", None),
])
def test_a_damaged_progress_record_is_refused_in_one_line(tmp_path, field, value):
    """A progress record whose fields are not of the shape a run writes (a damaged or edited file) is
    refused when it is read, naming the field: no later step of the resume meets a wrong type (a fuzzed
    record reached internal errors: an unhashable activation file, a list of orders, a shard without a
    name, a rank of 0)."""
    from streamrom.compression.progress import PROGRESS_FILE, Progress
    from streamrom.errors import OutputError

    (tmp_path / PROGRESS_FILE).write_text(json.dumps(GOOD_PROGRESS))
    assert Progress.load(tmp_path).blocks_done == 1
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({**GOOD_PROGRESS, field: value}))
    with pytest.raises(OutputError, match=f"unreadable \\({field} is not what a run writes\\); pass --overwrite"):
        Progress.load(tmp_path)


def test_a_progress_record_changed_after_it_was_written_is_refused(tmp_path):
    """A record that still parses after a change (a flipped digit: another rank, of the right type) does
    not match the checksum save wrote into it; a record of an earlier version, without one, is read."""
    from streamrom.compression.progress import PROGRESS_FILE, Progress
    from streamrom.errors import OutputError

    Progress(**GOOD_PROGRESS).save(tmp_path)
    assert Progress.load(tmp_path) == Progress(**GOOD_PROGRESS)
    text = (tmp_path / PROGRESS_FILE).read_text()
    assert '"model.layers.0.self_attn.q_proj": 8' in text
    (tmp_path / PROGRESS_FILE).write_text(text.replace('"model.layers.0.self_attn.q_proj": 8',
                                                       '"model.layers.0.self_attn.q_proj": 9'))
    with pytest.raises(OutputError, match="does not match its checksum .*; pass --overwrite"):
        Progress.load(tmp_path)
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(GOOD_PROGRESS))
    assert Progress.load(tmp_path) == Progress(**GOOD_PROGRESS)
