"""A checkpoint (dense, or compressed by streamrom) to one GGUF file for llama.cpp, one tensor at a time
(the `convert` extra: the `gguf` package).

What llama.cpp can run, and how each kind of part maps onto it:
- dense blocks, and MLPs narrowed to one width in every block: llama.cpp's own architecture of the
  model (llama, qwen2, gemma3; Gemma's norms stored as 1 + w, its sliding/full layer pattern and
  both rope bases in the metadata), `feed_forward_length` the narrowed width;
- MLP widths that differ from block to block: llama.cpp's `deci` architecture (llama-family models
  without biases), which takes a feed-forward length and head counts per block; the other
  architectures have one width per model, so their narrower MLPs are padded with zero neurons up to
  the widest block's (exactly the same function: gelu/silu of 0 times 0 adds nothing; logged);
- value dimensions narrowed per KV head and query/key rotary pairs: llama.cpp has one head size for
  the whole model, so they are padded back with zero rows and columns (exactly the same function;
  the file grows by what the narrowing saved in those tensors, logged);
- factored linears (two low-rank factors): llama.cpp has no such linear. They are refused, with the
  bytes multiplying them back would add, unless `densify` (the product V·(VᵀW) is written as one
  dense matrix: the same function up to rounding, the parameters of a dense linear).

The metadata and each tensor's shape and type are known from the headers before any data is written,
so the file is written front to back holding one tensor (as read, transformed, quantised) at a time; it
is written under a temporary name and renamed when complete.

Tokenizer (from tokenizer.json): byte-level BPE vocabularies (GPT-2 style: SmolLM, Llama 3, Qwen2) as
llama.cpp's "gpt2" model with their merges and their pre-tokenizer named as llama.cpp knows it;
SentencePiece vocabularies (BPE with byte fallback: Llama 2, Mistral, Gemma) as its "llama" model,
whose merges are priced by token scores: a token scores -id (SentencePiece BPE numbers its pieces in
merge order, and transformers keeps those ids), byte tokens <0xNN> 0, control and user-defined tokens
-1000, as llama.cpp's own converter writes them; whether a space is put before the text comes from
the normalizer (Prepend "▁") or the Metaspace pre-tokenizer.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..linalg.structured import kept_pair_rows
from ..model.architectures import ROTARY_PAIRS, UNITS, ModelSpec
from ..storage.checkpoint import CheckpointReader
from ..storage.layout import (GGUF_TYPES as TYPES, LLAMA_QUANTIZE_TYPES, LLAMA_QUANTIZE_VARIABLE, check_output_file,
                     read_json)
from .importer import permute_rotary
from ..model.families import FAMILIES, Family
from ..errors import InputError, OutputError, UsageError, write_failure
from ..storage.importance import IMPORTANCE_FILE, read_importance
from .vocab import SPLIT_PRE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED
from ..model.modeling import Block, block_prefix, rope_inverse_frequencies

log = logging.getLogger(__name__)

TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 1, 2, 5, 6
SPECIAL_TOKEN_SCORE = -1000.0  # control and user-defined tokens, as llama.cpp's converter scores them
SENTENCEPIECE_SPACE = "\u2581"  # "▁", SentencePiece's escaped space
def block_tensors(family: Family) -> dict[str, str]:
    """The block's linears and norms, HF name -> llama.cpp's (blk.N.<name>): the import's table turned
    round, so both directions share one mapping."""
    return {hf: short for short, hf in family.gguf_block_names.items()}


@dataclass
class _Tensor:
    """One tensor of the GGUF: its name, numpy shape (rows, columns), storage type, and how to make it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # a key of TYPES other than "source"
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[_ggml_type(self.kind)]
        return math.prod(self.shape) // block * size


def export_gguf(checkpoint: str | Path, output: str | Path, tensor_type: str = "source", densify: bool = False,
                overwrite: bool = False, llama_quantize: str | Path | None = None,
                imatrix: str | Path | None = None, threads: int | None = None,
                own_imatrix: bool = True) -> dict[str, Any]:
    """Write `checkpoint` as the GGUF file `output`. Returns what was written (architecture, tensors,
    bytes, parameters re-added by padding or densifying).

    A type of LLAMA_QUANTIZE_TYPES is made by llama.cpp's own quantizer: the f16 export is written as a
    temporary beside `output`, then `llama-quantize` (`llama_quantize`, else $STREAMROM_LLAMA_QUANTIZE,
    else the one on PATH), with the importance matrix `imatrix` if given (llama.cpp's imatrix GGUF),
    quantizes it into `output`; the file appears under its name only when complete. Without `imatrix`,
    a checkpoint that compress wrote with its input energies (importance.IMPORTANCE_FILE) hands those to
    the quantizer as its importance matrix (`own_imatrix`; False: none)."""
    try:
        import gguf
    except ImportError:
        raise UsageError("export-gguf needs the gguf package: pip install 'streamrom[convert]'") from None
    if tensor_type not in TYPES + LLAMA_QUANTIZE_TYPES:
        raise UsageError(f"unknown --type {tensor_type!r}: choose from {', '.join(TYPES + LLAMA_QUANTIZE_TYPES)}")
    quantizer = find_llama_quantize(llama_quantize, f"--type {tensor_type}") if tensor_type in LLAMA_QUANTIZE_TYPES else None
    if imatrix is not None and quantizer is None:
        raise UsageError(f"--imatrix is read by llama.cpp's quantizer: give a --type it makes "
                         f"({', '.join(LLAMA_QUANTIZE_TYPES)})")
    if imatrix is not None and not own_imatrix:
        raise UsageError("--imatrix and --no-imatrix contradict each other: give one")
    if imatrix is not None:
        check_imatrix(Path(imatrix))
    output = Path(output)
    check_output_file(Path(checkpoint), output)
    if output.exists() and not overwrite:
        raise OutputError(f"{output} exists (pass --overwrite to replace it)")
    if output.is_dir():
        raise OutputError(f"{output} is a folder: give the .gguf file's path")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():  # said before the work (a quantized type's export, minutes of it, came first)
        raise OutputError(f"cannot write {output}: its folder {folder} does not exist")
    if quantizer is not None:
        unquantized = output.with_name(f".{output.name}.f16.tmp")
        own = output.with_name(f".{output.name}.imatrix.tmp")
        try:
            summary = export_gguf(checkpoint, unquantized, "f16", densify, overwrite=True)
            source = "given" if imatrix is not None else None
            if imatrix is None and own_imatrix and write_llama_imatrix(Path(checkpoint), own, densify):
                imatrix, source = own, "checkpoint"
                log.info("export-gguf: importance matrix from the checkpoint's own calibration (%s)", IMPORTANCE_FILE)
            run_llama_quantize(quantizer, unquantized, output, tensor_type, imatrix, threads)
        finally:
            unquantized.unlink(missing_ok=True)
            own.unlink(missing_ok=True)
        return {**summary, "bytes": output.stat().st_size, "imatrix": source}
    reader = CheckpointReader(Path(checkpoint))
    spec = reader.spec
    plan = _Plan(reader, spec, tensor_type, densify)
    temporary = output.with_name(f".{output.name}.tmp")
    writer = gguf.GGUFWriter(None, plan.architecture)
    try:
        plan.metadata(writer)
        for tensor in plan.tensors:
            raw = _ggml_type(tensor.kind)
            if tensor.kind in ("f32", "f16"):
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32 if tensor.kind == "f32"
                                                                           else np.float16), tensor.nbytes)
            else:
                writer.add_tensor_info(tensor.name, gguf.quant_shape_to_byte_shape(tensor.shape, raw),
                                       np.dtype(np.uint8), tensor.nbytes, raw_dtype=raw)
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan.tensors:
            values = np.ascontiguousarray(tensor.make(), dtype=np.float32)
            writer.write_tensor_data(gguf.quants.quantize(values, _ggml_type(tensor.kind)))
        writer.close()
        os.replace(temporary, output)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise write_failure(exc, output.parent, "") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    summary = {"architecture": plan.architecture, "tensors": len(plan.tensors), "bytes": output.stat().st_size,
               "padded_parameters": plan.padded, "densified_linears": plan.densified,
               "densified_parameters": plan.densified_parameters}
    if plan.padded:
        log.info("export-gguf: narrowed widths padded back with zeros: %d parameters more than the checkpoint "
                 "holds (llama.cpp has one head size per model, one MLP width but in deci)", plan.padded)
    return summary


def write_llama_imatrix(checkpoint: Path, path: Path, densify: bool) -> bool:
    """llama.cpp's importance matrix (a GGUF of general.type "imatrix": per matrix `<name>.in_sum2`, the
    sums of squares of its input columns, and `<name>.counts`, the tokens summed over) from the
    checkpoint's importance.IMPORTANCE_FILE, each vector laid out as the exported matrix's columns
    (narrowed heads and MLPs padded back with zeros, where the weights are zero too). False where the
    checkpoint has none."""
    import gguf

    found = read_importance(checkpoint)
    if found is None:
        return False
    sums, tokens = found
    reader = CheckpointReader(checkpoint)
    plan = _Plan(reader, reader.spec, "f16", densify)
    seqlen = int(read_json(checkpoint / "config.json", "config.json").get("streamrom", {})
                 .get("calibration", {}).get("seqlen", 512))
    writer = gguf.GGUFWriter(path, plan.architecture)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["streamrom compress calibration"])
    writer.add_uint32("imatrix.chunk_count", max(1, tokens // seqlen))
    writer.add_uint32("imatrix.chunk_size", seqlen)
    for index in range(reader.spec.num_layers):
        for hf, short in plan.block_tensors.items():
            name = f"{block_prefix(index)}{hf}"
            if hf.endswith("norm"):
                continue
            if name not in sums:
                raise InputError(f"{checkpoint / IMPORTANCE_FILE} has no energies for {name}")
            stored = reader.shapes.get(f"{name}.weight") or reader.shapes.get(f"{name}.reduce.weight")
            if stored is None or sums[name].shape != (stored[-1],):
                # (llama-quantize would fail on it with a message about the model, not this file)
                raise InputError(f"{checkpoint / IMPORTANCE_FILE} holds {sums[name].size} energies for {name}, "
                                 f"which reads {stored[-1] if stored else 'no'} columns")
            columns = plan.input_layout(index, hf, sums[name])
            writer.add_tensor(f"blk.{index}.{short}.weight.in_sum2", columns.astype(np.float32))
            writer.add_tensor(f"blk.{index}.{short}.weight.counts", np.array([tokens], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return True


def check_imatrix(path: Path) -> None:
    """An importance matrix llama-quantize reads: a GGUF file of general.type "imatrix" (checked before the
    export, which would otherwise be written for nothing)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise InputError(f"importance matrix not found: {path}")
    try:
        field = GGUFReader(path).fields.get("general.type")
        kind = field.contents() if field is not None else None
    except Exception as exc:
        raise InputError(f"--imatrix {path} is not a GGUF file: {exc}") from None
    if kind != "imatrix":
        raise InputError(f"--imatrix {path} is a GGUF file of type {kind!r}, not an importance matrix (\"imatrix\")")


def find_llama_quantize(given: str | Path | None, wanted: str) -> Path:
    """llama.cpp's llama-quantize: `given`, else $STREAMROM_LLAMA_QUANTIZE, else on PATH; one line if none
    (`wanted`: what needs it, e.g. "--type q4_k_m")."""
    import shutil

    candidate = given or os.environ.get(LLAMA_QUANTIZE_VARIABLE) or shutil.which("llama-quantize")
    if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
        return Path(candidate)
    where = f"{candidate} is not an executable file" if candidate else "it is not installed (not on PATH)"
    raise UsageError(f"{wanted} is made by llama.cpp's llama-quantize, and {where}: build it from "
                     f"llama.cpp (docs/gguf.md) and pass --llama-quantize PATH or set {LLAMA_QUANTIZE_VARIABLE}")


def run_llama_quantize(quantizer: Path, source: Path, output: Path, tensor_type: str, imatrix: str | Path | None,
                       threads: int | None, extra: list[str] = (), warn_fallback: bool = True) -> None:
    """llama-quantize from `source` to `output`, through a temporary beside it renamed when complete
    (`extra`: its options, e.g. --pure; `warn_fallback`: log the tensors of a type their rows do not fit)."""
    import subprocess

    temporary = output.with_name(f".{output.name}.tmp")
    command = [str(quantizer), *extra, *(["--imatrix", str(imatrix)] if imatrix is not None else []), str(source),
               str(temporary), tensor_type.upper(), str(threads or os.cpu_count() or 1)]
    log.info("export-gguf: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not temporary.is_file():
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            said = next((line for line in reversed(lines) if "error" in line.lower() or "failed" in line.lower()),
                        lines[-1] if lines else "no output")
            raise InputError(f"llama-quantize failed (exit {result.returncode}): {said.strip()[:300]}")
        fallback = next((line for line in result.stderr.splitlines() if "required fallback" in line), None)
        if fallback and warn_fallback:  # a K-quant needs rows of a multiple of 256 values; llama.cpp stores others in a type near
            log.warning("export-gguf: llama-quantize: %s", fallback.split("WARNING:")[-1].strip())
        os.replace(temporary, output)
    except OSError as exc:
        raise write_failure(exc, output.parent, "") from None
    finally:
        temporary.unlink(missing_ok=True)


def _ggml_type(kind: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]


def rope_factors(spec: ModelSpec) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 rope scaling: per rotary pair, the factor its frequency is
    divided by (the unscaled frequency over the scaled one that streamrom and transformers rotate by)."""
    unscaled = rope_inverse_frequencies(replace(spec, rope_scaling=None))
    return (unscaled / rope_inverse_frequencies(spec)).numpy().astype(np.float32)


class _Plan:
    """Architecture, metadata and the ordered tensors of the GGUF, from the checkpoint's headers."""

    def __init__(self, reader: CheckpointReader, spec: ModelSpec, tensor_type: str, densify: bool) -> None:
        self.reader, self.spec = reader, spec
        self.padded = 0
        self.densified: list[str] = []
        self.densified_parameters = 0
        family = FAMILIES[spec.model_type]
        architecture = family.gguf_writes_as
        if architecture is None:
            raise InputError(f"export-gguf writes {', '.join(t for t, f in FAMILIES.items() if f.gguf_writes_as)} "
                             f"models, not {spec.model_type}")
        self.rope_type = dict(spec.rope_scaling).get("rope_type", "?") if spec.rope_scaling else None
        if self.rope_type not in (None, "linear", "llama3"):
            raise InputError(f"export-gguf: rope scaling {self.rope_type!r} is not exported (linear and llama3 are)")
        if spec.sliding_window is not None and not family.gguf_sliding_window:
            raise InputError(f"export-gguf: a sliding attention window has no form in llama.cpp's {architecture} "
                             "architecture")
        family.check_export(spec)
        self.family = family
        self.block_tensors = block_tensors(family)
        self.plus_one = family.gguf_norms_plus_one
        self.widths = spec.layer_intermediate_sizes or (spec.intermediate_size,) * spec.num_layers
        per_block = len(set(self.widths)) > 1
        self.mlp_width = max(self.widths)  # the width of every block's MLP in the file, unless deci
        # per-block MLP widths: the family's llama.cpp architecture for them (deci), which has no biases
        self.per_block_widths = bool(per_block and family.gguf_per_block_widths
                                     and not (spec.qkv_bias or spec.o_bias or spec.mlp_bias))
        if self.per_block_widths:
            architecture = family.gguf_per_block_widths
        elif per_block:
            log.info("export-gguf: llama.cpp's %s has one MLP width per model: narrower blocks padded with zero "
                     "neurons to %d", architecture, self.mlp_width)
        self.architecture = architecture
        self.source_kind = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(
            str(reader.weight_dtype).removeprefix("torch."), "f32")
        self.matrix_kind = self.source_kind if tensor_type == "source" else tensor_type
        factored = sorted({name.rsplit(".", 2)[0] for name in reader.weight_map if name.endswith(".reduce.weight")})
        if factored and not densify:
            extra = sum(self._dense_parameters(name) - self._stored_parameters(name) for name in factored)
            raise InputError(f"{len(factored)} linears are factored (two low-rank matrices), which llama.cpp cannot "
                             f"run; --densify multiplies them back ({extra:,} more parameters, "
                             f"{100 * extra / reader.parameter_count():.1f} % of the checkpoint's)")
        self.tensors = self._tensors(factored)
        biases = [t.name for t in self.tensors if t.name.endswith(".bias")]
        if biases and not family.gguf_biases:
            raise InputError(f"llama.cpp's {architecture} has no bias tensors, and this model has {len(biases)} "
                             f"({', '.join(biases[:3])}{', …' if len(biases) > 3 else ''}): compress it with "
                             "--no-bias to run it in llama.cpp")

    # -- metadata

    def metadata(self, writer) -> None:
        import gguf

        spec, config = self.spec, self.reader.config
        writer.add_name(Path(self.reader.folder).name)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(spec.hidden_size)
        writer.add_block_count(spec.num_layers)
        if self.per_block_widths:
            writer.add_feed_forward_length(list(self.widths))
            writer.add_head_count([spec.num_heads] * spec.num_layers)
            writer.add_head_count_kv([spec.num_kv_heads] * spec.num_layers)
        else:
            writer.add_feed_forward_length(self.mlp_width)
            writer.add_head_count(spec.num_heads)
            writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(float(spec.rope_theta))
        if self.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(spec.rope_scaling["factor"]))
        writer.add_layer_norm_rms_eps(float(spec.rms_norm_eps))
        self.family.export_metadata(writer, spec)
        writer.add_vocab_size(spec.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[self.matrix_kind])
        if "streamrom" in config:
            writer.add_string("streamrom.settings", json.dumps(config["streamrom"], default=str)[:60000])
        _tokenizer_metadata(writer, self.reader.folder, spec, config)

    # -- tensors

    def _tensors(self, factored: list[str]) -> list[_Tensor]:
        spec, weight_map = self.spec, self.reader.weight_map
        tensors = [self._matrix("token_embd.weight", "model.embed_tokens.weight")]
        for index in range(spec.num_layers):
            prefix = block_prefix(index)
            for hf, short in self.block_tensors.items():
                name = f"{prefix}{hf}"
                if hf.endswith("norm"):
                    tensors.append(self._vector(f"blk.{index}.{short}.weight", f"{name}.weight"))
                    continue
                tensors.append(self._linear(f"blk.{index}.{short}.weight", index, hf, name in factored))
                if f"{name}.bias" in weight_map or f"{name}.expand.bias" in weight_map or (
                        f"{name}.reduce.bias" in weight_map):
                    tensors.append(self._bias(f"blk.{index}.{short}.bias", index, hf, name in factored))
        tensors.append(self._vector("output_norm.weight", "model.norm.weight"))
        if self.rope_type == "llama3":
            tensors.append(_Tensor("rope_freqs.weight", (spec.head_dim // 2,), "f32", lambda: rope_factors(spec)))
        if "lm_head.weight" in weight_map:
            tensors.append(self._matrix("output.weight", "lm_head.weight"))
        return tensors

    def _kind(self, shape: tuple[int, ...]) -> str:
        import gguf

        kind = self.matrix_kind
        if kind in ("q8_0", "q4_0") and shape[-1] % gguf.GGML_QUANT_SIZES[_ggml_type(kind)][0]:
            return "f16"  # a narrowed width that is no multiple of the block size: not quantisable
        return kind

    def _read(self, name: str) -> np.ndarray:
        return self.reader.tensor(name).float().numpy()

    def _matrix(self, gguf_name: str, hf_name: str) -> _Tensor:
        shape = tuple(self.reader.shapes[hf_name])
        return _Tensor(gguf_name, shape, self._kind(shape), lambda: self._read(hf_name))

    def _vector(self, gguf_name: str, hf_name: str) -> _Tensor:
        """A norm's weight (Gemma's as 1 + w: llama.cpp's RMS norm multiplies by the weight alone)."""
        offset = 1.0 if self.plus_one and hf_name.endswith("norm.weight") else 0.0
        return _Tensor(gguf_name, tuple(self.reader.shapes[hf_name]), "f32", lambda: self._read(hf_name) + offset)

    def _dense_shape(self, index: int, linear: str) -> tuple[int, int]:
        """The linear's shape in the GGUF: full head sizes, the block's own MLP width (deci) or the model's."""
        spec = self.spec
        width = self.widths[index] if self.per_block_widths else self.mlp_width
        heads, kv_heads, hidden = spec.num_heads, spec.num_kv_heads, spec.hidden_size
        return {"self_attn.q_proj": (heads * spec.head_dim, hidden),
                "self_attn.k_proj": (kv_heads * spec.head_dim, hidden),
                "self_attn.v_proj": (kv_heads * spec.head_dim, hidden),
                "self_attn.o_proj": (hidden, heads * spec.head_dim),
                "mlp.gate_proj": (width, hidden), "mlp.up_proj": (width, hidden),
                "mlp.down_proj": (hidden, width)}[linear]

    def _dense_parameters(self, name: str) -> int:
        index, linear = int(name.split(".")[2]), name.split(".", 3)[3]
        return math.prod(self._dense_shape(index, linear))

    def _stored_parameters(self, name: str) -> int:
        return sum(math.prod(self.reader.shapes[f"{name}.{part}.weight"]) for part in ("reduce", "expand"))

    def _linear(self, gguf_name: str, index: int, linear: str, factored: bool) -> _Tensor:
        name = f"{block_prefix(index)}{linear}"
        shape = self._dense_shape(index, linear)
        if factored:
            self.densified.append(name)
            self.densified_parameters += math.prod(shape) - self._stored_parameters(name)
        else:
            self.padded += math.prod(shape) - math.prod(self.reader.shapes[f"{name}.weight"])

        def make() -> np.ndarray:
            if factored:
                weight = self._read(f"{name}.expand.weight") @ self._read(f"{name}.reduce.weight")
            else:
                weight = self._read(f"{name}.weight")
            return self._to_gguf_layout(index, linear, weight)
        return _Tensor(gguf_name, shape, self._kind(shape), make)

    def _bias(self, gguf_name: str, index: int, linear: str, factored: bool) -> _Tensor:
        name = f"{block_prefix(index)}{linear}"
        shape = (self._dense_shape(index, linear)[0],)

        def make() -> np.ndarray:
            if not factored:
                bias = self._read(f"{name}.bias")
            else:  # W x + b ≈ E (R x + b_r) + b_e
                bias = np.zeros(shape[0], dtype=np.float32)
                if f"{name}.reduce.bias" in self.reader.weight_map:
                    bias += self._read(f"{name}.expand.weight") @ self._read(f"{name}.reduce.bias")
                if f"{name}.expand.bias" in self.reader.weight_map:
                    bias += self._read(f"{name}.expand.bias")
            return self._to_gguf_layout(index, linear, bias[:, None], bias=True)[:, 0]
        return _Tensor(gguf_name, shape, "f32", make)

    def input_layout(self, index: int, linear: str, columns: np.ndarray) -> np.ndarray:
        """A vector over the linear's input columns (as the checkpoint stores it) laid out as the GGUF
        matrix's columns: padded back with zeros where a unit narrowed the value the linear reads (the
        unit's features are that value: o_proj's value dimensions, down's neurons)."""
        reads = next(group.reads for group in Block.GROUPS if linear in group.linears)
        if any(unit.narrows_reads and unit.reads == reads and linear in unit.linears for unit in UNITS):
            return self._to_gguf_layout(index, linear, np.ones((1, columns.size)) * columns)[0]
        return columns

    def _to_gguf_layout(self, index: int, linear: str, rows: np.ndarray, bias: bool = False) -> np.ndarray:
        """A weight (or a bias, as one column) padded back where structured ROM narrowed it (each unit's
        UNIT_PADDING: llama.cpp holds one head size per model, and one MLP width but in deci); q/k rows
        then permuted as llama.cpp's converter permutes them for the families that say so (llama's:
        rotary halves interleaved)."""
        for unit in UNITS:
            if linear in unit.linears:
                rows = UNIT_PADDING[unit.name](self, index, linear, rows, bias)
        if linear in ("self_attn.q_proj", "self_attn.k_proj") and self.family.gguf_permuted_query_key:
            rows = permute_rotary(rows, _query_key_heads(self.spec, linear))
        return np.ascontiguousarray(rows)


# -- what each structured unit (model/architectures.UNITS) pads back: pad(layout, block index, linear, rows,
# bias) -> the linear's rows (a bias: one column) in the GGUF's widths; the unit's features stay where
# llama.cpp reads them, zeros fill the rest.

def _pad_neurons(layout: _Plan, index: int, linear: str, rows: np.ndarray, bias: bool) -> np.ndarray:
    """gate's and up's rows, down's columns, with zero neurons up to the block's width in the file (the
    model's widest MLP where the architecture has one width)."""
    width = layout._dense_shape(index, "mlp.down_proj")[1]
    if linear != "mlp.down_proj" and rows.shape[0] < width:
        return np.concatenate([rows, np.zeros((width - rows.shape[0], rows.shape[1]), rows.dtype)])
    if linear == "mlp.down_proj" and not bias and rows.shape[1] < width:
        return np.concatenate([rows, np.zeros((rows.shape[0], width - rows.shape[1]), rows.dtype)], axis=1)
    return rows


def _pad_values(layout: _Plan, index: int, linear: str, rows: np.ndarray, bias: bool) -> np.ndarray:
    """Each KV head's value rows of v_proj, each query head's columns of o_proj, then zeros to head_dim."""
    spec = layout.spec
    if not spec.layer_value_head_dims or (bias and linear == "self_attn.o_proj"):
        return rows
    width = spec.layer_value_head_dims[index]
    if linear == "self_attn.v_proj":
        return _pad_rows(rows, spec.num_kv_heads, width, spec.head_dim)
    return _pad_rows(rows.T, spec.num_heads, width, spec.head_dim).T


def _scatter_query_key(layout: _Plan, index: int, linear: str, rows: np.ndarray, bias: bool) -> np.ndarray:
    """q's and k's kept rotary pairs back in their places in every head, zero rows between."""
    spec = layout.spec
    if not spec.layer_query_key_head_dims or spec.layer_query_key_head_dims[index] == spec.head_dim:
        return rows
    pairs = layout._read(f"{block_prefix(index)}{ROTARY_PAIRS}").astype(np.int64)
    return _scatter_pairs(rows, _query_key_heads(spec, linear), pairs, spec.head_dim)


def _query_key_heads(spec: ModelSpec, linear: str) -> int:
    """The heads q_proj's (query heads) or k_proj's (KV heads) rows hold."""
    return spec.num_heads if linear == "self_attn.q_proj" else spec.num_kv_heads


UNIT_PADDING = {"mlp.neurons": _pad_neurons, "self_attn.value_dims": _pad_values,
                "self_attn.rotary_pairs": _scatter_query_key}


def _pad_rows(rows: np.ndarray, heads: int, width: int, head_dim: int) -> np.ndarray:
    """Each head's `width` rows, then zero rows up to head_dim (llama.cpp takes one value width per model)."""
    if width == head_dim:
        return rows
    full = np.zeros((heads, head_dim, rows.shape[1]), dtype=rows.dtype)
    full[:, :width] = rows.reshape(heads, width, rows.shape[1])
    return full.reshape(heads * head_dim, rows.shape[1])


def _scatter_pairs(rows: np.ndarray, heads: int, pairs: np.ndarray, head_dim: int) -> np.ndarray:
    """Each head's kept rotary pairs put back in place (structured.kept_pair_rows), zeros between."""
    full = np.zeros((heads * head_dim, rows.shape[1]), dtype=rows.dtype)
    full[kept_pair_rows(pairs, head_dim, heads)] = rows
    return full


# -- the tokenizer

def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer's
    structure (the rules gguf/vocab.py rebuilds on import)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # llama.cpp splits every digit apart for it (as for starcoder and others)
    if kinds == ["Split", "ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        for name, regex in SPLIT_PRE.items():
            if pattern == regex:
                return name
    raise InputError(f"export-gguf: a pre-tokenizer of kinds {kinds} is not known to streamrom's exporter")


def _tokenizer_metadata(writer, folder: Path, spec: ModelSpec, config: dict[str, Any]) -> None:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"export-gguf: no tokenizer.json in {folder} (llama.cpp needs the vocabulary)")
    try:
        tokenizer = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    try:
        _vocabulary_metadata(writer, tokenizer, spec, path)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        # what the checks in _vocabulary_metadata do not name: a field of another type than tokenizers writes
        raise InputError(f"{path} is not laid out as tokenizers writes it ({type(exc).__name__}: {exc})") from None
    settings_path = Path(folder) / "tokenizer_config.json"
    settings = read_json(settings_path, "tokenizer_config.json") if settings_path.is_file() else {}
    if not isinstance(settings, dict):
        raise InputError(f"{settings_path} is not a JSON object")
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and 0 <= config[key] < 2**31:
            add(config[key])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    if isinstance(settings.get("chat_template"), str):
        writer.add_chat_template(settings["chat_template"])


def _vocabulary_metadata(writer, tokenizer: Any, spec: ModelSpec, path: Path) -> None:
    """Tokens, types (and merges or scores) of a tokenizer.json; every id checked before it sizes a list."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError("export-gguf writes BPE vocabularies (byte-level, or SentencePiece's with byte "
                         f"fallback); this tokenizer is {model.get('type')!r}")
    vocab, added_tokens = model.get("vocab"), tokenizer.get("added_tokens") or []
    if (not isinstance(vocab, dict) or not isinstance(added_tokens, list)
            or not all(isinstance(a, dict) and isinstance(a.get("content"), str) for a in added_tokens)):
        raise InputError(f"{path}: model.vocab must map tokens to ids and added_tokens list tokens with their content")
    ids = [*vocab.values(), *(added.get("id") for added in added_tokens)]
    # an added token may lie past the embedding's rows (llama.cpp then has a row more), by at most one each
    bound = spec.vocab_size + len(added_tokens)
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < bound), None)
    if not ids:
        raise InputError(f"{path}: the vocabulary is empty")
    if bad is not None:
        raise InputError(f"{path}: token id {bad!r} is not an id of this model's vocabulary (0..{bound - 1})")
    size = max(spec.vocab_size, max(ids) + 1)  # the embedding's rows; ids it has no token for are padding
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_TYPE_UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, TOKEN_TYPE_NORMAL
    for added in added_tokens:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_TYPE_CONTROL if added.get("special") else TOKEN_TYPE_USER_DEFINED
    if model.get("byte_fallback"):
        _sentencepiece_vocabulary(writer, tokenizer, tokens, types)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge)
                                 for merge in model.get("merges", [])])


def _sentencepiece_vocabulary(writer, tokenizer: dict[str, Any], tokens: list[str], types: list[int]) -> None:
    """llama.cpp's "llama" (SentencePiece) vocabulary: the tokens, their types and scores, and whether a
    space goes before the text."""
    unknown = (tokenizer.get("model") or {}).get("unk_token")
    scores = []
    for index, (text, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_TYPE_NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[index] = kind = TOKEN_TYPE_BYTE  # what byte fallback emits: llama.cpp decodes it to the byte
        elif kind == TOKEN_TYPE_NORMAL and text == unknown:
            types[index] = kind = TOKEN_TYPE_UNKNOWN
        scores.append(-float(index) if kind == TOKEN_TYPE_NORMAL
                      else 0.0 if kind in (TOKEN_TYPE_BYTE, TOKEN_TYPE_UNKNOWN) else SPECIAL_TOKEN_SCORE)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(sentencepiece_space_prefix(tokenizer))


def sentencepiece_space_prefix(tokenizer: dict[str, Any]) -> bool:
    """Whether a SentencePiece tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix):
    Llama 2's legacy normalizer Prepend("▁") + Replace(" ", "▁"), or a Metaspace pre-tokenizer with a
    prepend scheme other than "never"; Gemma's normalizer only replaces spaces. A tokenizer that never
    writes spaces as "▁" is not SentencePiece's, and llama.cpp's "llama" vocabulary always does."""
    def parts(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        step = step or {}
        return list(step.get(key, [])) if step.get("type") == "Sequence" else ([step] if step else [])

    normalizers = parts(tokenizer.get("normalizer"), "normalizers")
    pre_tokenizers = parts(tokenizer.get("pre_tokenizer"), "pretokenizers")
    metaspace = [part for part in pre_tokenizers if part.get("type") == "Metaspace"]
    replaces = any(part.get("type") == "Replace" and (part.get("pattern") or {}).get("String") == " "
                   and part.get("content") == SENTENCEPIECE_SPACE for part in normalizers)
    if not (replaces or metaspace):
        raise InputError("export-gguf: a byte-fallback BPE tokenizer that does not write spaces as '▁' has no "
                         "llama.cpp vocabulary")
    if any(part.get("type") == "Prepend" and part.get("prepend") == SENTENCEPIECE_SPACE for part in normalizers):
        return True
    schemes = {part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never")
               for part in metaspace}
    if "first" in schemes:
        # measured: benchmarks/gguf/sentencepiece.py
        log.warning("export-gguf: the tokenizer puts '▁' before the start of the text only (Metaspace "
                    "prepend_scheme 'first'); llama.cpp puts it there and after every special or added token, "
                    "so text that follows one is tokenized differently")
    return bool(schemes - {"never"})
