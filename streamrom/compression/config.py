"""How to compress: the settings of one run (CompressConfig), validated up front, and the layer list."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..linalg.bayes import BayesConfig
from ..stream.calibration import CalibrationConfig
from ..errors import UsageError
from .methods import METHODS, Method
from ..model.modeling import BLOCK_LINEARS
from ..linalg.structured import NEURON_SELECTIONS

ALLOCATIONS = ("uniform", "last-n", "spectrum", "bayes")
TARGET_BASES = ("mix", "select")
FIRST_PASS_ALLOCATIONS = ("spectrum", "bayes")  # need spectrum's pass 1 (bayes starts from its plan)
# Half target, half general (each normalised to unit output energy first): until benchmarks/quality/targeted.py
# measures otherwise, the mix that keeps both texts' directions in the basis.
DEFAULT_TARGET_WEIGHT = 0.5
PRECISIONS = {"float32": np.float32, "float64": np.float64}
OUTPUT_DTYPES = {"source": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. `ratio` is the fraction of each compressed linear's parameters kept."""

    ratio: float = 0.8
    rank: int | None = None  # a fixed rank for every chosen linear (capped at min(out, in))
    layers: str = "all"  # "all", "last:N", or indices and ranges like "0-3,7"
    modules: tuple[str, ...] = BLOCK_LINEARS
    method: str = "rom"  # rom (uncentered output PCA), rom-centered (+ mean-correction bias), svd (weights only)
    allocate: str = "uniform"  # uniform, last-n (ROM's scheme), spectrum (two-pass: output energy priced by the loss gradient)
    target_params: float | None = None  # whole-model parameter count after compression, as a fraction
    target_size_gb: float | None = None  # or as the output's tensor bytes, in GB (1e9 bytes)
    ranks: dict[str, int | None] | None = None  # an explicit plan ("model.layers.<i>.<name>": rank), e.g. a report's
    spectra_file: Path | None = None  # spectrum's pass 1: reused from here when made for the same inputs, else saved here
    damping: float = 1e-6  # relative to the mean eigenvalue; see decompose.damped
    chunk_tokens: int = 2048  # tokens per forward chunk: bounds activation memory
    precision: str = "float32"  # of the per-chunk moment products and the eigen work (sums: float64)
    dtype: str = "source"  # dtype of the output tensors: source, float32, float16 or bfloat16
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Task-targeted compression: the application's text, mixed with `calibration` (the general text)
    # per linear as α·C_target/E_target + (1−α)·C_general/E_general (α = target_weight; 1: target only).
    target_calibration: CalibrationConfig | None = None
    target_weight: float = DEFAULT_TARGET_WEIGHT
    # "mix": the mix's top-r eigenvectors; "select": the r directions keeping the most target output
    # energy among the mix's eigenvectors and the target's own top r (decompose.select_basis)
    target_basis: str = "mix"
    bayes: BayesConfig = field(default_factory=BayesConfig)  # --allocate bayes: trials, seed, held-out windows
    # pass 1 (spectrum, bayes) on at most this many of the calibration tokens, whole sequences spread
    # over the set (None: all): it ranks directions and neurons, the fits of pass 2 see every token
    pass1_tokens: int | None = None
    neuron_selection: str = "obs"  # structured MLP: greedy structured OBS, ridge leverage, or pass 1's OBS order (linalg/structured.py)
    # anchored fits: a dense stream beside the compressed one, and each fit's target moved from the
    # dense weights' outputs on the compressed inputs (0: off) to the dense model's outputs (1)
    anchor: float = 0.0
    # centered methods add a mean-correction bias to each factored (and refitted) linear; off, they fit
    # the uncentered moments instead, for runtimes whose graph has no bias (llama.cpp's gemma3)
    mean_bias: bool = True
    # block refinement (compression/refinement.py): optimiser steps per block on its compressed
    # parameters toward the dense block's outputs (0: off), the first relative to each tensor's RMS,
    # down to 0 along a cosine
    refine_steps: int = 0
    refine_lr: float = 1e-2
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise UsageError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocate!r}: choose from {', '.join(ALLOCATIONS)}")
        if self.target_params is not None and self.target_size_gb is not None:
            raise UsageError("give --target-params or --target-size, not both")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise UsageError(f"--target-params must be in (0, 1], got {self.target_params}")
        if self.target_size_gb is not None and not (math.isfinite(self.target_size_gb) and self.target_size_gb > 0):
            raise UsageError(f"--target-size must be positive, got {self.target_size_gb}")
        if (self.rank is not None or self.ranks is not None) and (self.allocate != "uniform" or self.has_target):
            raise UsageError("--rank and --ranks-from fix the ranks: they do not combine with --allocate or a target")
        if not 0.0 <= self.anchor <= 1.0:
            raise UsageError(f"--anchor must be in [0, 1], got {self.anchor}")
        if self.pass1_tokens is not None and (self.pass1_tokens < 1 or self.allocate not in FIRST_PASS_ALLOCATIONS):
            raise UsageError("--pass1-tokens sizes pass 1: a positive count, with --allocate "
                             f"{' or '.join(FIRST_PASS_ALLOCATIONS)}")
        if self.anchor and not self.compression_method.uses_calibration:
            raise UsageError(f"--method {self.method} uses no calibration text, so nothing to anchor")
        if self.anchor and self.target_calibration is not None:
            raise UsageError("--anchor does not combine with a target text (yet)")
        if self.refine_steps < 0 or not (math.isfinite(self.refine_lr) and self.refine_lr > 0):
            raise UsageError("--refine-steps must be >= 0 and --refine-lr positive")
        if self.refine_steps and not self.compression_method.uses_calibration:
            raise UsageError(f"--method {self.method} uses no calibration text, so nothing to refine toward")
        if not 0.0 <= self.target_weight <= 1.0:
            raise UsageError(f"--target-weight must be in [0, 1], got {self.target_weight}")
        if self.target_basis not in TARGET_BASES:
            raise UsageError(f"unknown --target-basis {self.target_basis!r}: choose mix or select")
        if self.target_basis == "select" and self.target_calibration is None:
            raise UsageError("--target-basis select needs --target-text")
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.neuron_selection not in NEURON_SELECTIONS:
            raise UsageError(f"unknown --neuron-selection {self.neuron_selection!r}: choose from "
                             f"{', '.join(NEURON_SELECTIONS)}")
        if self.neuron_selection == "pass1" and (self.allocate not in FIRST_PASS_ALLOCATIONS or self.ranks is not None):
            raise UsageError("--neuron-selection pass1 keeps the neurons in the order pass 1 found: use it with "
                             f"--allocate {' or '.join(FIRST_PASS_ALLOCATIONS)} and without --ranks-from")
        if self.compression_method.structured and (self.target_calibration is not None or self.rank is not None):
            raise UsageError(f"--method {self.method} takes neither a target text nor --rank (yet): use rom-centered")
        if self.target_calibration is not None:
            if not self.compression_method.uses_calibration:
                raise UsageError(f"--method {self.method} uses no calibration text, so no target text either")
            if self.target_calibration.seqlen != self.calibration.seqlen:
                raise UsageError("the target and general calibration sequences must have the same length")
        if not self.compression_method.priced_by_pass_one and self.allocate in FIRST_PASS_ALLOCATIONS:
            raise UsageError(f"--allocate {self.allocate} prices the directions ROM keeps; with --method "
                             f"{self.method} use uniform or last-n")
        if self.bayes.study is not None and self.allocate != "bayes":
            raise UsageError("--study shares the search of --allocate bayes: use it with that allocation")
        if self.spectra_file is not None and self.allocate not in FIRST_PASS_ALLOCATIONS:
            raise UsageError("--spectra keeps the first pass of --allocate spectrum: use it with that allocation")
        unknown = [m for m in self.modules if m not in BLOCK_LINEARS]
        if unknown:
            raise UsageError(f"unknown module {unknown[0]!r}: choose from {', '.join(BLOCK_LINEARS)}")
        if self.damping < 0:
            raise UsageError(f"damping must be >= 0, got {self.damping}")
        if self.chunk_tokens < 1:
            raise UsageError(f"chunk tokens must be at least 1, got {self.chunk_tokens}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}: choose from {', '.join(OUTPUT_DTYPES)}")

    def output_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        return source_dtype if self.dtype == "source" else OUTPUT_DTYPES[self.dtype]

    @property
    def compression_method(self) -> Method:
        method = METHODS[self.method]
        return method if self.mean_bias or not method.centered else dataclasses.replace(method, centered=False)

    @property
    def centered(self) -> bool:  # (pass 1 prices the directions of ROM's centered or uncentered fit)
        return self.compression_method.centered

    @property
    def anchored(self) -> bool:
        """Anchored fits: a dense stream beside the compressed one (__post_init__ refuses --anchor for
        methods without calibration, so this is all it takes)."""
        return self.anchor > 0

    @property
    def has_target(self) -> bool:
        return self.target_params is not None or self.target_size_gb is not None

    def record(self, layers: list[int], sequences: int, seqlen: int, target_from: int | None) -> dict[str, Any]:
        """The settings as the report records them (and, less the text files, as resume fingerprints them)."""
        settings = {"ratio": self.ratio, "rank": self.rank, "layers": layers,
                    "modules": list(self.modules), "method": self.method, "allocate": self.allocate,
                    "target_params": self.target_params, "target_size_gb": self.target_size_gb,
                    "damping": self.damping, "chunk_tokens": self.chunk_tokens, "dtype": self.dtype,
                    "precision": self.precision, "ranks": self.ranks,
                    **({"neuron_selection": self.neuron_selection} if self.compression_method.structured else {}),
                    **({"anchor": self.anchor} if self.anchor else {}),
                    **({"refine_steps": self.refine_steps, "refine_lr": self.refine_lr} if self.refine_steps else {}),
                    **({"pass1_tokens": self.pass1_tokens} if self.pass1_tokens is not None else {}),
                    **({} if self.mean_bias else {"mean_bias": False}),
                    "calibration": {"files": [str(p) for p in self.calibration.text_files] or ["(default)"],
                                    "token_file": str(self.calibration.token_file or ""),
                                    "sequences": sequences, "seqlen": seqlen,
                                    "seed": self.calibration.seed},
                    "target": None if target_from is None else {
                        "files": [str(p) for p in self.target_calibration.text_files],
                        "token_file": str(self.target_calibration.token_file or ""),
                        "sequences": sequences - target_from, "general_sequences": target_from,
                        "target_weight": self.target_weight}}
        if self.allocate == "bayes":
            settings["bayes"] = {"trials": self.bayes.trials, "seed": self.bayes.seed,
                                 "held_out_windows": self.bayes.held_out_windows,
                                 # shared or not, the same search (its storage and name: not the result's)
                                 **({"shared_study": True} if self.bayes.study else {})}
        return settings

    def fingerprint(self, settings: dict[str, Any], target_from: int | None) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (the calibration tokens are hashed apart)."""
        fingerprint = {k: v for k, v in settings.items() if k not in ("calibration", "target")}
        fingerprint["target"] = None if target_from is None else [target_from, self.target_weight]
        return fingerprint


def config_to_json(config: CompressConfig) -> dict[str, Any]:
    """The settings as plain JSON (paths absolute), for a worker elsewhere to rebuild them: see config_from_json."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value.absolute())
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value
    return plain(config)


def config_from_json(data: dict[str, Any]) -> CompressConfig:
    def calibration(part: dict[str, Any] | None) -> CalibrationConfig | None:
        if part is None:
            return None
        return CalibrationConfig(**{**part, "text_files": tuple(Path(p) for p in part["text_files"]),
                                    "token_file": Path(part["token_file"]) if part["token_file"] else None})
    try:
        return CompressConfig(**{
            **data, "modules": tuple(data["modules"]), "calibration": calibration(data["calibration"]),
            "target_calibration": calibration(data["target_calibration"]), "bayes": BayesConfig(**data["bayes"]),
            "spectra_file": Path(data["spectra_file"]) if data["spectra_file"] else None})
    except (KeyError, TypeError) as exc:
        raise UsageError(f"settings from another streamrom version: {exc}") from None


def parse_layers(text: str, num_layers: int) -> list[int]:
    """Block indices from "all", "last:N" (ROM's choice: the last N blocks) or "0-3,7"."""
    text = text.strip()
    if text == "all":
        return list(range(num_layers))
    if text.startswith("last:"):
        try:
            count = int(text[5:])
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected last:N with an integer N") from None
        if not 0 <= count <= num_layers:
            raise UsageError(f"--layers {text!r}: the model has {num_layers} blocks")
        return list(range(num_layers - count, num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(v) for v in part.split("-", 1))
                if last < first:
                    raise UsageError(f"--layers {text!r}: the range {part} is empty (write it first-last)")
                chosen.update(range(first, last + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected all, last:N, or indices like 0-3,7") from None
    if any(not 0 <= i < num_layers for i in chosen):
        raise UsageError(f"--layers {text!r}: indices must be in 0..{num_layers - 1}")
    return sorted(chosen)
