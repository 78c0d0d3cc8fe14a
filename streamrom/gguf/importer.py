"""GGUF to a Hugging Face safetensors folder, one tensor at a time (the `convert` extra: the `gguf` package).

Only the GGUF's metadata is parsed up front (names, types, shapes, offsets); each tensor's bytes are then
read with `pread`, dequantised by `gguf.quants`, un-permuted where llama.cpp permuted it, cast and
appended to its shard. The safetensors headers are computed before any data is written (every shape is
known from the metadata), so a shard is written front to back without holding more than one tensor.
Peak memory is therefore one quantised tensor plus its dequantised copy, whatever the model's size.

The tokenizer is rebuilt from the GGUF's vocabulary (gguf/vocab.py).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..model.architectures import ModelSpec, block_prefix
from ..model.families import GGUF_FAMILIES, GLOBAL_NAMES
from ..storage.checkpoint import check_block_count, numbered_shard
from ..errors import InputError, OutputError, write_failure
from ..storage.layout import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, check_output_path, tensor_bytes, write_atomic
from .vocab import gguf_tokenizer
from ..storage.locking import OutputLock

log = logging.getLogger(__name__)


OUTPUT_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", None)}


def find_gguf(source: str) -> Path:
    """A .gguf path, or the name of an installed package that carries exactly one .gguf file."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file not found: {source}")
        return path
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{source!r} is neither a .gguf file nor an installed package holding one")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise InputError(f"package {source} holds {len(files)} .gguf files, expected one")
    return files[0]


# ---------------------------------------------------------------------------------------------- arrays


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter interleaves each head's two rotary halves).

    llama.cpp reshapes rows to (heads, 2, head_dim/2) and swaps the last two axes; this swaps them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def permute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half layout to llama.cpp's interleaved one (the inverse of unpermute_rotary)."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def to_output_dtype(array: np.ndarray, dtype: str) -> bytes:
    """float32 values as the bytes of the output dtype (bfloat16 rounded to nearest even, as torch does)."""
    code, numpy_dtype = OUTPUT_DTYPES[dtype]
    array = np.ascontiguousarray(array, dtype=np.float32)
    if numpy_dtype is not None:
        return array.astype(numpy_dtype).tobytes()
    bits = array.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(array), 0x7FC0, rounded)  # a NaN stays a NaN
    return rounded.astype(np.uint16).tobytes()


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The header of a safetensors file whose (name, dtype code, shape, nbytes) entries follow in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


# -------------------------------------------------------------------------------------------- metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


METADATA_KINDS = {
    "positive integer": lambda v: _is_int(v) and 0 < v < 2**31,
    "token id": lambda v: _is_int(v) and 0 <= v < 2**31,
    "positive number": lambda v: _is_number(v) and v > 0,
    "string": lambda v: isinstance(v, str),
    "flag": lambda v: isinstance(v, (bool, int)),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "list of flags": lambda v: isinstance(v, list) and all(isinstance(x, (bool, int)) for x in v),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class GGUFTensor:
    gguf_name: str
    hf_name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows first)
    data_offset: int
    n_bytes: int
    rotary_heads: int | None  # heads to un-permute q/k rows by, or None
    offset: float = 0.0  # subtracted from every value (Gemma's norms, stored as 1 + w)

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))


DERIVED_TENSORS = ("rope_freqs.weight",)  # computed from the config by llama.cpp's converter, not weights


class GGUFModel:
    """A GGUF file's metadata and its tensors' places, read without touching tensor data.

    `derived_ok`: tensors llama.cpp derives from the config (DERIVED_TENSORS: Llama 3's rope_freqs) are set
    aside in `derived` instead of refused; `correct` reads a base's matrices and needs none of them, while
    import-gguf would lose the rope scaling they carry and so still refuses them."""

    def __init__(self, path: Path, derived_ok: bool = False):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise InputError("import-gguf needs the gguf package: pip install 'streamrom[convert]'") from None
        self.path = path
        try:
            reader = GGUFReader(path)
        except Exception as exc:
            raise InputError(f"cannot read {path} as GGUF: {exc}") from None
        # Plain values only: the reader's per-item field views of a 50k-token vocabulary weigh ~150 MB.
        try:  # a damaged string (not UTF-8) or array fails only when its contents are read
            self.metadata = {name: field.contents() for name, field in reader.fields.items()
                             if not name.startswith("GGUF.")}
        except Exception as exc:
            raise InputError(f"cannot read the metadata of {path} as GGUF: {type(exc).__name__}: {exc}") from None
        self.arch = self.value("general.architecture", kind="string")
        if self.arch not in GGUF_FAMILIES:
            raise InputError(f"{path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: {', '.join(sorted(GGUF_FAMILIES))})")
        self.family = GGUF_FAMILIES[self.arch]
        self.heads = self.value(f"{self.arch}.attention.head_count", kind="positive integer")
        self.kv_heads = self.value(f"{self.arch}.attention.head_count_kv", self.heads, "positive integer")
        self.derived = [t.name for t in reader.tensors if derived_ok and t.name in DERIVED_TENSORS]
        self.tensors = [self._tensor(t) for t in reader.tensors if t.name not in self.derived]
        del reader  # drops the file mapping; tensor data is read by offset

    def value(self, key: str, default: Any = ..., kind: str | None = None) -> Any:
        """The metadata value under `key` (`default` where absent), checked to be of `kind` (one of
        METADATA_KINDS): a file can hold any type under any key, and a value used as a size or an index
        is only used once it is one."""
        if key not in self.metadata:
            if default is ...:
                raise InputError(f"{self.path}: GGUF metadata has no {key}")
            return default
        value = self.metadata[key]
        if kind is not None and not METADATA_KINDS[kind](value):
            raise InputError(f"{self.path}: GGUF metadata {key} must be a {kind}, got {_shown(value)}")
        return value

    def _tensor(self, tensor: Any) -> GGUFTensor:
        name = tensor.name
        stem, _, kind = name.rpartition(".")
        block_names = self.family.gguf_block_names
        block = re.fullmatch(r"blk\.(\d{1,9})\.(.+)", stem)
        if stem in GLOBAL_NAMES:
            hf = f"{GLOBAL_NAMES[stem]}.{kind}"
        elif block is not None and block.group(2) in block_names:
            hf = f"model.layers.{int(block.group(1))}.{block_names[block.group(2)]}.{kind}"
        else:
            raise InputError(f"{self.path}: tensor {name!r} has no Hugging Face {self.arch} counterpart "
                             "(e.g. llama3 rope_freqs or an unsupported variant)")
        rotary = None
        if self.family.gguf_permuted_query_key and stem.endswith((".attn_q", ".attn_k")):
            rotary = self.heads if stem.endswith(".attn_q") else self.kv_heads
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        offset = 1.0 if self.family.gguf_norms_plus_one and hf.endswith("norm.weight") else 0.0
        return GGUFTensor(name, hf, tensor.tensor_type, shape, int(tensor.data_offset), int(tensor.n_bytes), rotary,
                          offset)

    def config(self, dtype: str) -> dict[str, Any]:
        arch, names = self.arch, {t.hf_name for t in self.tensors}
        # the file's block_count sizes lists below (the sliding pattern): held to its tensors' blocks first
        check_block_count(self.value(f"{arch}.block_count", kind="positive integer"), names, self.path, f"{arch}.block_count is")
        model_type, architecture = self.family.model_type, self.family.transformers_class
        hidden = self.value(f"{arch}.embedding_length", kind="positive integer")
        scaling = self.value(f"{arch}.rope.scaling.type", "none", "string")
        if scaling not in ("none", None):
            raise InputError(f"{self.path}: rope scaling {scaling!r} is not supported")
        head_dim = self.value(f"{arch}.attention.key_length", max(1, hidden // self.heads), "positive integer")
        tokens = self.value("tokenizer.ggml.tokens", None, "list of strings")
        vocab = self.value(f"{arch}.vocab_size", len(tokens) if tokens else 0, "positive integer")
        config: dict[str, Any] = {
            "architectures": [architecture], "model_type": model_type,
            "hidden_size": hidden, "intermediate_size": self.value(f"{arch}.feed_forward_length", kind="positive integer"),
            "num_hidden_layers": self.value(f"{arch}.block_count", kind="positive integer"),
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": head_dim,
            "max_position_embeddings": self.value(f"{arch}.context_length", kind="positive integer"),
            "rms_norm_eps": float(self.value(f"{arch}.attention.layer_norm_rms_epsilon", kind="positive number")),
            "rope_theta": float(self.value(f"{arch}.rope.freq_base", 10000.0, "positive number")),
            "vocab_size": vocab, "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in names, "torch_dtype": dtype,
        }
        self.family.import_config(self, config, names)
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"),
                          ("unk_token_id", "unknown")):
            token = self.value(f"tokenizer.ggml.{name}_token_id", None, "token id")
            if token is not None:
                config[key] = int(token)
        return config

    def row_chunks(self, tensor: GGUFTensor, handle: int, max_bytes: int = 1 << 24) -> Iterator[np.ndarray]:
        """A tensor as float32 rows in HF's layout, at most about `max_bytes` at a time.

        Reads from the open file descriptor `handle`. Chunks of q/k rows hold whole heads, since the
        rotary un-permutation moves rows only within a head.
        """
        from gguf import GGML_QUANT_SIZES, quants

        rows = int(np.prod(tensor.shape[:-1])) if len(tensor.shape) > 1 else 1
        columns = tensor.shape[-1]
        block_size, type_size = GGML_QUANT_SIZES[tensor.qtype]
        row_bytes = columns // block_size * type_size
        if row_bytes * rows != tensor.n_bytes:
            raise InputError(f"{self.path}: tensor {tensor.gguf_name} has {tensor.n_bytes} bytes, "
                             f"expected {row_bytes * rows}")
        step = max(1, max_bytes // (4 * columns))
        if tensor.rotary_heads is not None:
            head_rows = rows // tensor.rotary_heads
            step = max(1, step // head_rows) * head_rows
        for start in range(0, rows, step):
            count = min(step, rows - start)
            raw = os.pread(handle, count * row_bytes, tensor.data_offset + start * row_bytes)
            if len(raw) != count * row_bytes:
                raise InputError(f"{self.path} is truncated: tensor {tensor.gguf_name} is incomplete")
            try:
                values = quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(count, row_bytes),
                                           tensor.qtype)
            except NotImplementedError as exc:
                raise InputError(f"{self.path}: tensor {tensor.gguf_name}: {exc}") from None
            values = np.asarray(values, dtype=np.float32).reshape(count, columns)
            if tensor.offset:
                values = values - np.float32(tensor.offset)
            if tensor.rotary_heads is not None:
                values = unpermute_rotary(values, count // (rows // tensor.rotary_heads))
            yield values

    def dequantized(self, tensor: GGUFTensor, handle: int | None = None) -> np.ndarray:
        """One whole tensor as float32 in HF's layout, read through `handle` (an open descriptor of the
        file) or, without one, a descriptor of its own."""
        if handle is not None:
            return np.concatenate(list(self.row_chunks(tensor, handle))).reshape(tensor.shape)
        handle = os.open(self.path, os.O_RDONLY)
        try:
            return self.dequantized(tensor, handle)
        finally:
            os.close(handle)


# ------------------------------------------------------------------------------------------------ import


def _shards(tensors: list[GGUFTensor], code: str, shard_bytes: int) -> list[list[GGUFTensor]]:
    shards: list[list[GGUFTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor_bytes(tensor.shape, code)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _group(hf_name: str) -> str:
    """The block a tensor belongs to ("block N"), or "embedding and head" for the others."""
    parts = hf_name.split(".")
    return f"block {parts[2]}" if parts[:2] == ["model", "layers"] else "embedding and head"


def _write_folder(model: GGUFModel, folder: Path, config: dict[str, Any], tokenizer: Any,
                  tokenizer_settings: dict[str, Any], dtype: str, shard_bytes: int) -> int:
    """Write the shards (front to back, one row chunk at a time), index, tokenizer and config; returns
    the bytes of tensor data written."""
    code = OUTPUT_DTYPES[dtype][0]
    shards = _shards(model.tensors, code, shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [numbered_shard(i + 1, len(shards)) for i in range(len(shards))])
    # Progress goes by runs of tensors of one block (or of the embedding/norm/head), not per tensor.
    groups = [_group(t.hf_name) for t in model.tensors]
    steps = 1 + sum(a != b for a, b in zip(groups, groups[1:]))
    weight_map, total, done, position = {}, 0, 0, 0
    handle = os.open(model.path, os.O_RDONLY)
    try:
        for name, shard in zip(names, shards):
            entries = [(t.hf_name, code, t.shape, tensor_bytes(t.shape, code)) for t in shard]
            with open(folder / name, "wb") as out:
                out.write(safetensors_header(entries))
                for tensor, entry in zip(shard, entries):
                    for rows in model.row_chunks(tensor, handle):
                        out.write(to_output_dtype(rows, dtype))
                    weight_map[tensor.hf_name] = name
                    total += entry[3]
                    position += 1
                    if position == len(groups) or groups[position] != groups[position - 1]:
                        done += 1
                        log.info("import: %s done", groups[position - 1], extra={"progress": (done, steps, "import")})
                out.flush()
                os.fsync(out.fileno())
    finally:
        os.close(handle)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(folder / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    tokenizer.save(str(folder / "tokenizer.json"))
    write_atomic(folder / "tokenizer_config.json", (json.dumps(tokenizer_settings, indent=2) + "\n").encode())
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    write_atomic(folder / "generation_config.json", (json.dumps(generation, indent=2) + "\n").encode())
    write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return total


def check_tensor_shapes(model: GGUFModel, config: dict[str, Any]) -> None:
    """Every tensor has the shape the metadata implies, before any byte is written (what the metadata
    says, a head count say, sizes how the tensors are read)."""
    try:
        spec = ModelSpec.from_config(config)
    except InputError as exc:
        raise InputError(f"{model.path}: its metadata gives {str(exc).replace('config.json: ', '')}") from None
    expected = dict(spec.global_shapes())
    for index in range(spec.num_layers):
        expected.update({block_prefix(index) + name: shape for name, shape in spec.dense_block_shapes(index).items()})
    for tensor in model.tensors:
        shape = expected.get(tensor.hf_name)
        if shape is not None and tensor.shape != shape:
            raise InputError(f"{model.path}: tensor {tensor.gguf_name} has shape {list(tensor.shape)}, but the "
                             f"metadata implies {list(shape)}")


def import_gguf(source: str, output: str | Path, overwrite: bool = False, dtype: str = "float32",
                shard_bytes: int = 2 * 10 ** 9) -> Path:
    """Write `source` (a GGUF file, or a package holding one) as a safetensors folder with its tokenizer.

    Tensors are dequantised and written one at a time; the folder appears under its name only when
    complete (it is built under a temporary name and renamed).
    """
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"unknown output dtype {dtype!r} (choose from {', '.join(OUTPUT_DTYPES)})")
    gguf_path = find_gguf(source)
    model = GGUFModel(gguf_path)
    config = model.config(dtype)
    check_tensor_shapes(model, config)
    tokenizer, tokenizer_settings = gguf_tokenizer(model)
    output = Path(output).absolute()  # "." has no name to build the temporary folder's from
    check_output_path(gguf_path, output, create=False)
    # The output appears by renaming a finished temporary folder beside it: the lock lives there too.
    with OutputLock(output.parent, lock_path=output.with_name(f".{output.name}.streamrom.lock")):
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            if not overwrite:
                raise OutputError(f"output folder is not empty: {output} (pass --overwrite to replace it)")
        tmp = output.with_name(f".{output.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create {tmp}: {exc.strerror}") from None
        try:
            total = _write_folder(model, tmp, config, tokenizer, tokenizer_settings, dtype, shard_bytes)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written folder behind
            raise write_failure(exc, tmp) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    log.info("imported %s -> %s (%d tensors, %.0f MB)", gguf_path, output, len(model.tensors), total / 1e6)
    return output
