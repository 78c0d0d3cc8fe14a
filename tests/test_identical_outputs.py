"""Bit-identical model files across refactorings: the real model compressed with every method and
allocation, each file's SHA-256 against the digests recorded (tests/reference_outputs.json, written by
`python tests/test_identical_outputs.py --record LABEL`). First recorded from the code before the
redesign; recorded again, on purpose, when the arithmetic changed: the input moment's Cholesky factor
and one-triangle products (BLAS trmm/syrk) in the eigen stage instead of its eigen root and full
products (rounding-level differences; the quick start's perplexity moved from 28.446 to the README's);
and again when pass 1 priced gate/up from A = W̃L by syrk (rounding moved two ranks of
rom-centered-spectrum) and compress began writing its importance file, this time on an AMD EPYC
machine (the earlier recordings were an Intel Xeon's, where the test now skips).

Float results depend on the BLAS kernels and library versions, so the digests are compared where the
recording's environment (torch, numpy, scipy, CPU) is this one; elsewhere the test says so and skips.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RECORD = HERE / "reference_outputs.json"
# Three blocks (first, middle, last) and 4 x 128 calibration tokens: every code path of the block loop,
# pass 1 and the task-targeted statistics, in about a minute for all cases.
# Emma: the default calibration text when the digests were recorded
COMMON = ["--layers", "0,14,29", "--calib-sequences", "4", "--calib-seqlen", "128", "--ratio", "0.6",
          "--calib-text", str(HERE.parent / "streamrom" / "data" / "general" / "austen-emma.txt")]
CASES = {
    "rom-uniform": ["--method", "rom"],
    "rom-centered-uniform": ["--method", "rom-centered"],
    "svd-uniform": ["--method", "svd"],
    "rom-spectrum": ["--method", "rom", "--allocate", "spectrum"],
    "rom-centered-spectrum": ["--method", "rom-centered", "--allocate", "spectrum"],
    "rom-target-select": ["--method", "rom", "--target-text", "TARGET", "--target-basis", "select"],
}
MODEL_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json")


def environment() -> dict[str, str]:
    import numpy
    import scipy
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"torch": torch.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__, "cpu": cpu,
            "python": platform.python_version()}


# config.json's "streamrom" keys added after the recording (structured ROM): taken out before hashing,
# so that everything the recording saw is still compared byte for byte
ADDED_SINCE = ("centered", "dense_parameters")


def recorded_bytes(path: Path) -> bytes:
    if path.name != "config.json":
        return path.read_bytes()
    config = json.loads(path.read_text())
    for key in ADDED_SINCE:
        config["streamrom"].pop(key)  # absent: the format changed again and the recording must be redone
    return (json.dumps(config, indent=2) + "\n").encode()  # as the writer writes it


def file_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(recorded_bytes(path)).hexdigest()
            for pattern in MODEL_FILES for path in sorted(folder.glob(pattern))}


def compress_case(source: Path, output: Path, case: str, target_text: Path) -> dict[str, str]:
    from streamrom.cli import main

    arguments = [str(target_text) if a == "TARGET" else a for a in CASES[case]]
    assert main(["--quiet", "--threads", "1", "compress", str(source), str(output), *COMMON, *arguments]) == 0
    return file_digests(output)


def target_text() -> Path:
    """Code as the application's text: a module of the standard library (its version is in the
    environment record), never an evaluation text."""
    import json.decoder

    return Path(json.decoder.__file__)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_files_are_bit_identical_to_the_recording(smollm2_dir, tmp_path, case):
    recorded = json.loads(RECORD.read_text())
    if recorded["environment"] != environment():
        pytest.skip(f"digests recorded with {recorded['environment']}, this is {environment()}")
    digests = compress_case(smollm2_dir, tmp_path / case, case, target_text())
    assert digests == recorded["cases"][case]


if __name__ == "__main__" and "--record" in sys.argv:  # run with the code to record from
    import tempfile

    sys.path.insert(0, str(HERE))
    from conftest import CACHE

    source = CACHE / "smollm2-135m-instruct"
    with tempfile.TemporaryDirectory() as tmp:
        cases = {case: compress_case(source, Path(tmp) / case, case, target_text()) for case in sorted(CASES)}
    RECORD.write_text(json.dumps({"environment": environment(), "commit": sys.argv[-1], "cases": cases},
                                 indent=1) + "\n")
    print(f"recorded {len(cases)} cases in {RECORD}")
