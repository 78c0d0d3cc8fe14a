"""Reading a Hugging Face safetensors checkpoint lazily, and writing one shard at a time.

The reader validates every shard header and tensor shape up front (cheap: headers only), then hands
out one block's tensors at a time, opening each shard only for as long as it reads from it. The
writer puts every shard under a temporary name and renames it when complete; the index is written
last, so a folder without ``model.safetensors.index.json`` is visibly unfinished.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputError, NumericalError
from .layout import (CONFIG_FILE, INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, TOKENIZER_FILES,  # noqa: F401
                     check_output_path, read_json,
                     tensor_bytes, write_atomic)
from ..model.modeling import BLOCK_LINEARS, LM_HEAD, ModelSpec, block_prefix

log = logging.getLogger(__name__)


class CheckpointReader:
    """A checkpoint folder: config, spec, and lazy access to tensors by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise InputError(f"checkpoint folder not found: {self.folder}")
        if not self.folder.is_dir():
            raise InputError(f"checkpoint is not a folder: {self.folder}")
        self.config: dict[str, Any] = read_json(self.folder / CONFIG_FILE, "config.json")
        if not isinstance(self.config, dict):
            raise InputError(f"config.json in {self.folder} is not a JSON object")
        self.weight_map = {name: shard for name, shard in self._weight_map().items()
                           if not name.endswith(IGNORED_SUFFIXES)}
        # before the config sizes anything: a block count of 10**9 beside 30 blocks of tensors would
        # otherwise be looped over (layer types, expected names) before any comparison fails
        check_block_count(self.config.get("num_hidden_layers"), self.weight_map, self.folder)
        self.spec = ModelSpec.from_config(self.config)
        self.shapes, self.dtypes = self._read_headers()
        self._check_tensors()

    # -- discovery and validation -------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise InputError(f"{index_path} has no usable weight_map")
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise InputError(f"{index_path} names a shard outside the folder: {shard!r}")
                if not (self.folder / shard).is_file():
                    raise InputError(f"shard listed in the index is missing: {self.folder / shard}")
            return dict(weight_map)
        single = self.folder / SINGLE_FILE
        if single.is_file():
            with self._open(SINGLE_FILE) as handle:
                return {name: SINGLE_FILE for name in handle.keys()}
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{self.folder} holds only pickled weights ({pickles[0]}); streamrom never unpickles. "
                "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise InputError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.folder}")

    def _open(self, shard: str):
        try:
            return safe_open(str(self.folder / shard), framework="pt")
        except Exception as exc:  # safetensors raises several types for bad headers
            raise InputError(f"corrupt or unreadable shard {self.folder / shard}: {exc}") from None

    def _read_headers(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in self.weight_map.items():
            by_shard[shard].append(name)
        for shard, names in sorted(by_shard.items()):
            with self._open(shard) as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise InputError(f"tensor {name} is listed in the index but not in shard {shard}")
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = piece.get_dtype()
        return shapes, dtypes

    def _check_tensors(self) -> None:
        """Config and tensors agree: every tensor the config implies is present with its shape and a
        float dtype, and no tensor lies outside it; stops at the first that does not."""
        spec = self.spec
        for name, code in sorted(self.dtypes.items()):
            if code not in _TORCH_DTYPES:
                raise InputError(f"tensor {name} has dtype {code}; streamrom reads float32, float16 and bfloat16 weights")
        if spec.tie_word_embeddings and LM_HEAD in self.weight_map:
            raise InputError(f"config.json says tie_word_embeddings, but the checkpoint has its own {LM_HEAD}; "
                             "set tie_word_embeddings to false to use it, or remove it")
        self._check_known_names()
        self._check_shapes(spec.global_shapes())
        for index in range(spec.num_layers):
            dense_block = spec.dense_block_shapes(index)
            prefix = block_prefix(index)
            expected = {}
            for name, shape in dense_block.items():
                linear = name.rsplit(".", 1)[0]
                if linear in BLOCK_LINEARS and f"{prefix}{linear}.reduce.weight" in self.weight_map:
                    continue  # a compressed linear: its factors are checked below
                expected[prefix + name] = shape
            self._check_shapes(expected)
            for linear in BLOCK_LINEARS:
                if f"{prefix}{linear}.reduce.weight" in self.weight_map:
                    self._check_factors(prefix + linear, spec.linear_shape(linear, index))

    def _check_known_names(self) -> None:
        spec = self.spec
        known = set(spec.global_shapes())
        block_names = {name for index in range(spec.num_layers) for name in spec.dense_block_shapes(index)}
        for linear in BLOCK_LINEARS:
            block_names.update(f"{linear}.{part}.{kind}" for part in ("reduce", "expand") for kind in ("weight", "bias"))
        for name in sorted(self.weight_map):
            if name in known:
                continue
            match = _BLOCK_NAME.fullmatch(name)
            if match is None or match.group(2) not in block_names:
                raise InputError(f"tensor {name} in {self.folder} is not part of the model config.json describes")
            if int(match.group(1)) >= spec.num_layers:
                raise InputError(f"tensor {name} belongs to block {match.group(1)}, but config.json has "
                                 f"num_hidden_layers {spec.num_layers}")

    def _check_shapes(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in expected.items():
            if name not in self.shapes:
                raise InputError(f"tensor {name} is missing from the checkpoint {self.folder}")
            if self.shapes[name] != shape:
                raise InputError(
                    f"tensor {name} has shape {list(self.shapes[name])}, but config.json implies {list(shape)}"
                )

    def _check_factors(self, linear: str, shape: tuple[int, int]) -> None:
        reduce_shape = self.shapes.get(f"{linear}.reduce.weight")
        expand_shape = self.shapes.get(f"{linear}.expand.weight")
        out_features, in_features = shape
        if (reduce_shape is None or expand_shape is None or len(reduce_shape) != 2
                or len(expand_shape) != 2 or reduce_shape[1] != in_features
                or expand_shape != (out_features, reduce_shape[0])):
            raise InputError(f"low-rank factors of {linear} do not fit its shape {list(shape)}")

    # -- reading --------------------------------------------------------------------------------
    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors by name; each shard is opened only while its tensors are copied out."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise InputError(f"tensor {name} is missing from the checkpoint {self.folder}")
            by_shard[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_names in sorted(by_shard.items()):
            with self._open(shard) as handle:
                for name in shard_names:
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as exc:
                        raise InputError(f"cannot read tensor {name} from {self.folder / shard}: {exc}") from None
                    if tensor.is_floating_point() and not all_finite(tensor):
                        raise NumericalError(f"tensor {name} in {self.folder / shard} holds NaN or Inf values")
                    tensors[name] = tensor
        return tensors

    def tensor(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def block_names(self, index: int) -> list[str]:
        prefix = block_prefix(index)
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """One block's tensors, keyed without the ``model.layers.{i}.`` prefix."""
        prefix = block_prefix(index)
        return {name[len(prefix):]: t for name, t in self.read(self.block_names(index)).items()}

    def parameter_count(self) -> int:
        """Parameters as stored (a tied lm_head is not stored and so not counted twice)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the block weights (what the output is written in)."""
        name = f"{block_prefix(0)}input_layernorm.weight"
        return _TORCH_DTYPES.get(self.dtypes.get(name, "F32"), torch.float32)

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]

    def size_on_disk(self) -> int:
        return sum((self.folder / shard).stat().st_size for shard in set(self.weight_map.values()))


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value is finite, checked in slices: a whole-tensor mask would add a byte per
    value (half a bf16 tensor again) to the peak of loading."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start:start + chunk]).all()) for start in range(0, flat.numel(), chunk))


# Buffers that older checkpoints saved and that the model recomputes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def check_block_count(configured: Any, names: Iterable[str], folder: Path,
                      setting: str = "config.json has num_hidden_layers") -> None:
    """The configured block count names exactly the blocks the tensors hold (0..n-1, none missing).

    Costs one pass over the names, whatever the count says; a count that is not a positive integer is
    left to the caller's own check. `setting` says where the count comes from, for the message."""
    if isinstance(configured, bool) or not isinstance(configured, numbers.Integral) or configured < 1:
        return
    configured = int(configured)
    found = set()
    for name in names:
        match = _BLOCK_NAME.fullmatch(name)
        if match is not None:
            found.add(int(match.group(1)))
    if not found:
        raise InputError(f"{setting} {configured}, but {folder} holds no block tensors")
    if max(found) + 1 != configured:  # compared before any set of `configured` numbers is made
        raise InputError(f"the tensors in {folder} belong to blocks 0..{max(found)}, but {setting} {configured}")
    if len(found) != configured:
        raise InputError(f"{setting} {configured}, but the tensors in {folder} have no block "
                         f"{min(set(range(configured)) - found)}")
# numbered shards, as CheckpointWriter and import-gguf name them: number and total
NUMBERED_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def numbered_shard(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def clear_folder(folder: Path, keep: Iterable[str] = ()) -> None:
    """Remove a folder's contents, except the names in `keep`."""
    keep = set(keep)
    for child in Path(folder).iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard_is_complete(path: Path) -> bool:
    """Whether a safetensors file is all there: a readable header, and exactly as long as it says."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length < 100_000_000:
                return False
            header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return Path(path).stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


class CheckpointWriter:
    """Writes numbered shards atomically and, at the end, tokenizer files, config and index.

    `weight_map` carries over what an interrupted run already wrote.
    """

    def __init__(self, folder: Path, total_shards: int, weight_map: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        self.total_shards = total_shards
        self.weight_map: dict[str, str] = dict(weight_map or {})

    def shard_name(self, number: int) -> str:
        return numbered_shard(number, self.total_shards)

    def write_shard(self, number: int, tensors: Mapping[str, torch.Tensor],
                    before_rename: Callable[[], None] | None = None, scratch: Path | None = None) -> str:
        """Write shard `number` under a temporary name in `scratch` (default: the folder), then rename it.

        safetensors writes through a temporary file of its own beside its target: in a scratch folder
        that the run removes, a kill mid-write leaves no stray file in the model's folder."""
        name = self.shard_name(number)
        final = self.folder / name
        scratch = Path(scratch) if scratch is not None else self.folder
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = scratch / f".{name}.tmp"
        contiguous = {key: value.contiguous() for key, value in tensors.items()}
        try:
            save_file(contiguous, str(tmp), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors are not OSErrors: give them their errno back
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from None
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files: follow the umask, as open() does
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, final)
        for key in [k for k, v in self.weight_map.items() if v == name]:
            del self.weight_map[key]  # rewriting a shard of an interrupted run
        for key in contiguous:
            self.weight_map[key] = name
        return name

    def total_size(self) -> int:
        """Bytes of tensor data in all shards, from their headers (the index's metadata)."""
        total = 0
        for shard in sorted(set(self.weight_map.values())):
            with safe_open(str(self.folder / shard), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    total += tensor_bytes(piece.get_shape(), piece.get_dtype())
        return total

    def finish(self, config: Mapping[str, Any], tokenizer_files: Iterable[Path]) -> None:
        for path in tokenizer_files:
            write_atomic(self.folder / path.name, path.read_bytes())
        write_atomic(self.folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        index = {"metadata": {"total_size": self.total_size()}, "weight_map": dict(sorted(self.weight_map.items()))}
        write_atomic(self.folder / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())

